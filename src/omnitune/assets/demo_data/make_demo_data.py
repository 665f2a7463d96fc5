"""Regenerate the bundled demo dataset (demo.json + images/). Deterministic; run from anywhere:

    python src/omnitune/assets/demo_data/make_demo_data.py

The task is made to be learnt by a tiny random model in a few dozen steps, so `omnitune demo`
can check every answer: each image is one large, centred, flat-coloured square or circle in one
of four far-apart colours on white, and its answer names colour and shape ("A red square."). A third of the samples are text-only questions with fixed answers (the model
must tell them apart from the image questions).
"""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "yellow": (245, 225, 20)}
SHAPES = ["square", "circle"]
QUESTIONS = ["<image>What is in the picture?", "<image>\nWhat do you see?"]
TEXT_ONLY = {"Who are you?": "I am a tiny demo model.",
             "Which colors do you know?": "Red, green, blue and yellow.",
             "Which shapes do you know?": "Squares and circles.",
             "Say hello.": "Hello!"}


def draw(shape: str, color: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A square fills ~90% of the short side, a circle ~45%: centred with a jitter of a few pixels.
    The sizes differ on purpose: a tiny random vision tower tells the two apart from how much of
    the picture is coloured within a few dozen steps, but not from the corners alone (same-size
    shapes: 120 steps gave 20/36 answers right, the shapes at chance)."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    s = int(min(w, h) * (0.9 if shape == "square" else 0.45))
    x = (w - s) // 2 + rng.randint(-2, 2)
    y = (h - s) // 2 + rng.randint(-2, 2)
    box = (x, y, x + s, y + s)
    d = ImageDraw.Draw(img)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return img


def main() -> None:
    rng = random.Random(0)
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for old in images.glob("*.jpg"):
        old.unlink()
    samples = []
    k = 0
    for shape in SHAPES:
        for color in COLORS:
            for j in range(4):
                size = [(112, 112), (112, 84)][j % 2]
                name = f"images/{shape}_{color}_{k:02d}.jpg"
                draw(shape, color, size, rng).save(HERE / name, quality=90)
                samples.append({"images": [name], "messages": [
                    {"role": "user", "content": QUESTIONS[j % len(QUESTIONS)]},
                    {"role": "assistant", "content": f"A {color} {shape}."}]})
                k += 1
    for q, a in TEXT_ONLY.items():
        for _ in range(4):
            samples.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    rng.shuffle(samples)
    (HERE / "demo.json").write_text(json.dumps(samples, indent=1) + "\n")
    print(f"{len(samples)} samples, {k} images")


if __name__ == "__main__":
    main()
