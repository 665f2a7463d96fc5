"""Audio: read (soundfile; a video's audio track with PyAV), downmix to mono, resample to the
feature extractor's rate (PyAV's libswresample: no librosa needed), Whisper log-mel features.

Build time needs each audio's sample count at 16 kHz: a file already at that rate gives it from its
header; any other rate is read and resampled once (audio is cheap next to video). The feature
frame count and the audio token count follow from it by the family's rule (see templates.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from omnitune.data.formats import DataError

MIN_SAMPLES = 400  # the Whisper STFT window (n_fft); shorter audio has no feature frame to speak of


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 ``x`` at ``rate`` -> ``target`` Hz (libswresample through PyAV)."""
    if rate == target or not len(x):
        return x.astype(np.float32, copy=False)
    import av

    r = av.AudioResampler(format="fltp", layout="mono", rate=target)
    out = []
    step = 1 << 16
    for k in range(0, len(x), step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, k:k + step], dtype=np.float32),
                                           format="fltp", layout="mono")
        frame.sample_rate = rate
        out += [f.to_ndarray()[0] for f in r.resample(frame)]
    out += [f.to_ndarray()[0] for f in r.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def _check_file(path: str, where: str, kind: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: {kind} file not found: {p}")
    return p


def _read_file(path: str, where: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    p = _check_file(path, where, "audio")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DataError(f"{where}: audio {p} cannot be read ({e}); replace or remove it") from None
    return data.mean(axis=1), rate


def _read_video_track(path: str, where: str) -> tuple[np.ndarray, int]:
    import av

    p = _check_file(path, where, "video")
    try:
        with av.open(str(p), "r") as container:
            if not container.streams.audio:
                raise DataError(f"{where}: video {p} has no audio track but use_audio_in_video is true; "
                                f"set preprocess_parameters.use_audio_in_video false or give the video sound")
            stream = container.streams.audio[0]
            rate = stream.rate
            planar = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)  # [channels, n] arrays
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in planar.resample(frame)]
            chunks += [f.to_ndarray() for f in planar.resample(None)]
    except av.error.FFmpegError as e:
        raise DataError(f"{where}: the audio track of video {p} cannot be decoded ({e}); "
                        f"replace or remove it") from None
    if not chunks:
        return np.zeros(0, np.float32), rate
    return np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0), rate


def load_audio(path: str, where: str, rate: int, from_video: bool = False) -> np.ndarray:
    """Mono float32 waveform at ``rate`` Hz; errors name the file and sample when it is unreadable
    or too short to give one feature frame."""
    x, native = (_read_video_track if from_video else _read_file)(path, where)
    x = resample(x, native, rate)
    if len(x) < MIN_SAMPLES:
        what = "the audio track of video" if from_video else "audio"
        raise DataError(f"{where}: {what} {path} has {len(x)} samples at {rate} Hz, too short for one feature "
                        f"frame (at least {MIN_SAMPLES}); replace or remove it")
    return x


def audio_length(path: str, where: str, rate: int, from_video: bool = False) -> int:
    """Sample count at ``rate`` Hz, from the header when the file is already at that rate."""
    if not from_video:
        import soundfile as sf

        p = _check_file(path, where, "audio")
        try:
            info = sf.info(str(p))
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise DataError(f"{where}: audio {p} cannot be read ({e}); replace or remove it") from None
        if info.samplerate == rate:
            if info.frames < MIN_SAMPLES:
                raise DataError(f"{where}: audio {p} has {info.frames} samples at {rate} Hz, too short for one "
                                f"feature frame (at least {MIN_SAMPLES}); replace or remove it")
            return int(info.frames)
    return len(load_audio(path, where, rate, from_video))


def feature_frames(lengths: list[int], feature_extractor, pad_to_max: bool) -> list[int]:
    """Valid log-mel frames the Whisper extractor gives each of a sample's audios (``lengths`` in
    samples) when they are extracted together, as the HF Omni processors do: padded to the 30 s /
    300 s window (``pad_to_max``, Qwen2.5-Omni; longer audio is cut to it) or to the longest audio
    (Qwen3-Omni), in which case a shorter audio's count is rounded up and the longest's down."""
    hop = feature_extractor.hop_length
    if pad_to_max:
        return [-(-min(n, feature_extractor.n_samples) // hop) for n in lengths]
    longest = max(lengths) // hop
    return [min(-(-n // hop), longest) for n in lengths]


def audio_features(waves: list[np.ndarray], feature_extractor, pad_to_max: bool) -> tuple:
    """(input_features [n, mels, frames] float32, feature_attention_mask [n, frames] long) of a
    sample's audios, extracted in one call as the family's HF processor does, each cut to its
    valid frames and zero-padded to the longest (padding is masked)."""
    import torch

    n = feature_frames([len(w) for w in waves], feature_extractor, pad_to_max)
    if pad_to_max:
        # Padding to the extractor's full window (300 s for Qwen2.5-Omni) only appends silent frames:
        # the valid frames see at most n_fft/2 samples past the audio and the log-mel floor (max - 8)
        # comes from the audio, so zero-padding by one window past the longest gives the same frames.
        waves = [w[:feature_extractor.n_samples] for w in waves]
        width = max(len(w) for w in waves) + feature_extractor.n_fft
        waves = [np.pad(w, (0, width - len(w))) for w in waves]
    out = feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True,
                            return_tensors="pt", padding=True, truncation=False)
    got = out["attention_mask"].sum(-1).tolist()
    if not pad_to_max and got != n:  # the build-time token counts relied on n
        raise RuntimeError(f"feature extractor gave {got} frames, expected {n}")
    longest = max(n)
    x = out["input_features"][:, :, :longest].clone()
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, k in enumerate(n):
        x[i, :, k:] = 0
        mask[i, :k] = 1
    return x.float(), mask
