"""Videos: PyAV probe (build time, container header only) and decode (item time).

Frame sampling follows LLaMA-Factory / MindSpeed-MM: ``n = min(total_frames, video_maxlen,
max(1, floor(duration * video_fps)))`` frames at ``linspace(0, total_frames - 1, n)``. The sampled
frames go to the HF video processor as one uint8 array [n, H, W, 3] with a ``VideoMetadata`` whose
``frames_indices`` / ``fps`` are the real ones (Qwen3-VL's per-frame timestamps come from them) and
``do_sample_frames=False`` (the frames are already sampled). The HF processor repeats the last frame
up to a multiple of temporal_patch_size, exactly as MindSpeed-MM's even-frame padding does.

The patch grid is computed from the header (frame count, duration, size) with the same
smart_resize the processor uses, so the placeholder count is known at build time without decoding
a single frame. Item time checks the decoded grid against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnitune.data.formats import DataError


@dataclass(frozen=True)
class VideoInfo:
    """What the build step knows about a video (from its header)."""
    path: str
    height: int
    width: int
    total_frames: int
    fps: float                    # the stream's native frame rate
    duration: float               # seconds
    indices: tuple[int, ...]      # sampled frame indices

    @property
    def sample_fps(self) -> float:
        """Sampled frames per second of video (second_per_grid = temporal_patch_size / this)."""
        return len(self.indices) / self.total_frames * self.fps  # as VideoMetadata.sampled_fps

    def metadata(self):
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.total_frames, fps=self.fps, width=self.width, height=self.height,
                             duration=self.duration, video_backend="pyav", frames_indices=list(self.indices))


def _open(path: str, where: str):
    import av

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: video file not found: {p}")
    try:
        container = av.open(str(p), "r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{where}: video {p} cannot be opened ({e}); the file is truncated or not a video, "
                        f"replace or remove it") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{where}: video {p} has no video stream")
    return container


def sample_indices(total_frames: int, duration: float, video_fps: float, video_maxlen: int) -> tuple[int, ...]:
    n = min(total_frames, video_maxlen, max(1, math.floor(duration * video_fps)))
    return tuple(int(i) for i in np.linspace(0, total_frames - 1, n).astype(np.int32))


def probe_video(path: str, where: str, video_fps: float, video_maxlen: int) -> VideoInfo:
    """Header facts of the video and its sampled frame indices; no frame is decoded (a container
    without a frame count is counted by demuxing its packets)."""
    import av

    with _open(path, where) as container:
        s = container.streams.video[0]
        width, height = s.codec_context.width, s.codec_context.height
        rate = s.average_rate or s.base_rate or s.guessed_rate
        fps = float(rate) if rate else 0.0
        total = s.frames
        if not total:
            try:
                total = sum(1 for pkt in container.demux(s) if pkt.size)
            except av.error.FFmpegError as e:
                raise DataError(f"{where}: video {path} cannot be read ({e}); replace or remove it") from None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            duration = total / fps if fps else 0.0
    if not total or not width or not height:
        raise DataError(f"{where}: video {path} has no frames ({total} frames, {width}x{height}); "
                        f"replace or remove it")
    if not fps:
        fps = total / duration if duration else 1.0
    return VideoInfo(str(path), height, width, total, fps, duration,
                     sample_indices(total, duration, video_fps, video_maxlen))


def decode_frames(info: VideoInfo, where: str) -> np.ndarray:
    """The sampled frames, uint8 [n, H, W, 3] RGB."""
    import av

    wanted = set(info.indices)
    last = max(info.indices)
    got: dict[int, np.ndarray] = {}
    n_decoded, final = 0, None
    with _open(info.path, where) as container:
        stream = container.streams.video[0]
        try:
            frame = None
            for k, frame in enumerate(container.decode(stream)):
                n_decoded = k + 1
                if k in wanted:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
            final = frame
        except (av.error.FFmpegError, OSError) as e:
            raise DataError(f"{where}: video {info.path} cannot be decoded at frame {n_decoded} ({e}); the file "
                            f"is damaged, replace or remove it") from None
    if len(got) != len(wanted):
        # Container frame counts are often a frame or two high (edit lists, B-frames): the missing
        # tail frames are then the last decoded one. A larger gap means a damaged file.
        if final is None or info.total_frames - n_decoded > max(2, info.total_frames // 50):
            raise DataError(f"{where}: video {info.path} decodes to {n_decoded} frames but its header promises "
                            f"{info.total_frames} (truncated file?); replace or remove it")
        tail = final.to_ndarray(format="rgb24")
        got.update({i: tail for i in wanted if i not in got})
    frames = [got[i] for i in info.indices]
    if frames[0].shape[:2] != (info.height, info.width):
        raise DataError(f"{where}: video {info.path} frames are {frames[0].shape[1]}x{frames[0].shape[0]}, "
                        f"header said {info.width}x{info.height}")
    return np.stack(frames)


def video_grid(info: VideoInfo, where: str, video_processor, min_pixels: int, max_pixels: int,
               pixels_per: str) -> tuple[int, int, int]:
    """(t, h, w) patch grid the HF video processor produces for the sampled frames.

    ``pixels_per`` says how the family's video processor reads its pixel bounds: "frame" (Qwen2-VL's
    processor: each frame) or "clip" (Qwen3-VL's: all frames together, see :func:`processor_size`).
    """
    patch, merge, tps = video_processor.patch_size, video_processor.merge_size, video_processor.temporal_patch_size
    n = len(info.indices)
    lo, hi = processor_size(n, tps, min_pixels, max_pixels, pixels_per)
    try:
        if pixels_per == "clip":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_resize

            if n < tps:
                raise ValueError(f"{n} sampled frame(s) is fewer than temporal_patch_size {tps}; raise video_fps "
                                 f"or use a longer video")
            h, w = clip_resize(n, info.height, info.width, temporal_factor=tps, factor=patch * merge,
                               min_pixels=lo, max_pixels=hi)
        else:
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as frame_resize

            h, w = frame_resize(info.height, info.width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    except ValueError as e:
        raise DataError(f"{where}: video {info.path} ({info.width}x{info.height}, {n} sampled frames) cannot be "
                        f"used: {e}") from None
    return -(-n // tps), h // patch, w // patch


def processor_size(n_frames: int, temporal_patch_size: int, min_pixels: int, max_pixels: int,
                   pixels_per: str) -> tuple[int, int]:
    """(shortest_edge, longest_edge) to pass to the video processor so that data.json's
    video_min/max_pixels bound each frame whatever the family (a "clip" processor bounds the sum
    over the temporally padded frames)."""
    if pixels_per == "clip":
        t = max(round(n_frames / temporal_patch_size), 1) * temporal_patch_size
        return min_pixels * t, max_pixels * t
    return min_pixels, max_pixels


def process_videos(infos: list[VideoInfo], frames: list[np.ndarray], video_processor, min_pixels: int,
                   max_pixels: int, pixels_per: str) -> dict:
    """pixel_values_videos [n_patches, C*T*P*P] + video_grid_thw [k, 3] of already-sampled frames.
    Videos are processed one at a time: each has its own size bounds."""
    import torch

    pix, grids = [], []
    tps = video_processor.temporal_patch_size
    for info, fr in zip(infos, frames):
        lo, hi = processor_size(len(info.indices), tps, min_pixels, max_pixels, pixels_per)
        out = video_processor(videos=[fr], video_metadata=[info.metadata()], do_sample_frames=False,
                              size={"shortest_edge": lo, "longest_edge": hi}, cap_pixels_per_frame=False,
                              return_tensors="pt")
        pix.append(out["pixel_values_videos"])
        grids.append(out["video_grid_thw"])
    return {"pixel_values_videos": torch.cat(pix), "video_grid_thw": torch.cat(grids)}
