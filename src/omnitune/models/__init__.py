from omnitune.models.registry import get_family, family_for_model_id, FAMILIES  # noqa: F401
