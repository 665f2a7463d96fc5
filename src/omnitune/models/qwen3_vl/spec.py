"""Qwen3-VL (dense) and Qwen3-VL-MoE: everything omnitune knows that is specific to these families.

Layout: model.visual (patch embed + learned position embedding, blocks, merger and the DeepStack
mergers that inject features of some vision blocks into the first LLM layers), model.language_model,
lm_head. The MoE variant differs only in the text decoder (experts + router per layer).
"""
from __future__ import annotations

from torch import nn

from omnitune.models.base import QWEN_TEXT_LORA, ModelFamily, ModuleGroup, lora_map, text_sizes

# The real Qwen3-VL-*-Instruct chat template (Qwen3-VL-8B-Instruct; the 30B-A3B MoE ships the same),
# 5292 bytes, sha256 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

VOCAB = 151936           # real Qwen3-VL embedding rows
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
           vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>",
              vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")

SIZES = {
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, head_dim=16, vdepth=2, vdim=64, vinter=128,
                 vheads=4, deepstack=[0, 1], experts=4, topk=2, moe_inter=32),
    "bench": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, head_dim=32, vdepth=4, vdim=128, vinter=256,
                  vheads=4, deepstack=[1, 2], experts=8, topk=2, moe_inter=128),
}


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) rotary pairs in the real 24/20/20-of-64 proportion (head_dim 128)."""
    half = head_dim // 2
    hw = (half * 20) // 64
    return [half - 2 * hw, hw, hw]


class Qwen3VLFamily(ModelFamily):
    name = "qwen3_vl"
    model_ids = ("qwen3_vl",)
    template = "qwen3_vl"
    hf_class_name = "Qwen3VLForConditionalGeneration"
    hf_config_class_name = "Qwen3VLConfig"
    #: ViT blocks (fused qkv, proj, linear_fc1/2), merger and DeepStack mergers (linear_fc1/2); the
    #: MoE text decoder has no dense MLP: linear_fc1/2 reach its experts nowhere (only attention there)
    lora_target_map = lora_map(QWEN_TEXT_LORA, {
        "linear_qkv": (r"attn\.qkv",), "linear_proj": (r"attn\.proj",),
        "linear_fc1": (r"linear_fc1",), "linear_fc2": (r"linear_fc2",)})
    moe = False
    # DeepStack: the vision features added to the first decoder layers' hidden states at the visual
    # positions, one row per True of visual_pos_masks
    cp_masked_rows = {"deepstack_visual_embeds": "visual_pos_masks"}

    def tiny_config(self, size: str = "tiny"):
        s = SIZES[size]
        text = dict(
            vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
            head_dim=s["head_dim"], max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=not self.moe, bos_token_id=IDS["bos_token_id"],
            eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"],
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                             "mrope_section": interleaved_mrope_section(s["head_dim"])},
        )
        if self.moe:
            text.update(num_experts=s["experts"], num_experts_per_tok=s["topk"],
                        moe_intermediate_size=s["moe_inter"], decoder_sparse_step=1)
        return self.config_class()(
            text_config=text,
            vision_config=dict(depth=s["vdepth"], hidden_size=s["vdim"], intermediate_size=s["vinter"],
                               num_heads=s["vheads"], out_hidden_size=s["hidden"], patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               num_position_embeddings=64, deepstack_visual_indexes=s["deepstack"]),
            tie_word_embeddings=not self.moe,
            **{k: IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id")},
        )

    def build_processor(self, load_tokenizer):
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        tok = load_tokenizer(extra_special_tokens=TOKENS)
        # the real preprocessor_config.json: patch 16, mean/std 0.5, 65536..16777216 pixels
        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2, **norm)
        vp = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2, **norm)
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                chat_template=CHAT_TEMPLATE)

    def module_groups(self) -> list[ModuleGroup]:
        return [
            ModuleGroup("image_encoder.vision_encoder", ("model.visual",),
                        exclude=("model.visual.merger", "model.visual.deepstack_merger_list")),
            ModuleGroup("image_encoder.vision_projector",
                        ("model.visual.merger", "model.visual.deepstack_merger_list")),
            ModuleGroup("text_decoder", ("model.language_model", "lm_head")),
        ]

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.visual.blocks) + list(model.model.language_model.layers)

    def structure_sizes(self, config) -> dict[str, int]:
        t, v = config.text_config, config.vision_config
        return {
            "image_encoder.vision_encoder.num_layers": v.depth,
            "image_encoder.vision_encoder.hidden_size": v.hidden_size,
            "image_encoder.vision_encoder.ffn_hidden_size": v.intermediate_size,
            "image_encoder.vision_encoder.num_attention_heads": v.num_heads,
            "image_encoder.vision_encoder.patch_size": v.patch_size,
            "image_encoder.vision_encoder.spatial_merge_size": v.spatial_merge_size,
            "image_encoder.vision_encoder.temporal_patch_size": v.temporal_patch_size,
            "image_encoder.vision_encoder.in_channels": v.in_channels,
            "image_encoder.vision_encoder.out_hidden_size": v.out_hidden_size,
            "image_encoder.vision_encoder.llm_hidden_size": t.hidden_size,
            "image_encoder.vision_projector.input_size": v.hidden_size,
            "image_encoder.vision_projector.hidden_size": v.out_hidden_size,
            **text_sizes(t),
        }


class Qwen3VLMoeFamily(Qwen3VLFamily):
    name = "qwen3_vl_moe"
    model_ids = ("qwen3_vl_moe",)
    hf_class_name = "Qwen3VLMoeForConditionalGeneration"
    hf_config_class_name = "Qwen3VLMoeConfig"
    moe = True


SPEC = Qwen3VLFamily()
MOE_SPEC = Qwen3VLMoeFamily()
