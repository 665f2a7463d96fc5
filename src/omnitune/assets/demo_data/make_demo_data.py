"""Regenerate the bundled demo dataset (demo.json + images/). Deterministic; run from anywhere:

    python src/omnitune/assets/demo_data/make_demo_data.py

Image samples ask about a coloured shape on a plain background (answers are learnable from the
pixels); about a third of the samples are text-only arithmetic questions.
"""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ["square", "circle"]


def draw(shape: str, color: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    s = min(w, h) // 2
    x, y = rng.randint(2, w - s - 2), rng.randint(2, h - s - 2)
    box = (x, y, x + s, y + s)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return img


def main() -> None:
    rng = random.Random(0)
    (HERE / "images").mkdir(exist_ok=True)
    samples = []
    k = 0
    for shape in SHAPES:
        for color in COLORS:
            for _ in range(4):
                size = rng.choice([(56, 56), (84, 56), (112, 84), (112, 112)])
                name = f"images/{shape}_{color}_{k:02d}.jpg"
                draw(shape, color, size, rng).save(HERE / name, quality=85)
                q = rng.choice([f"<image>What color is the {shape}?", f"<image>\nWhich color does the {shape} have?"])
                turns = [{"role": "user", "content": q},
                         {"role": "assistant", "content": f"The {shape} is {color}."}]
                if k % 5 == 0:  # some two-turn conversations
                    turns += [{"role": "user", "content": "And what shape is it?"},
                              {"role": "assistant", "content": f"It is a {shape}."}]
                samples.append({"images": [name], "messages": turns})
                k += 1
    for i in range(16):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        samples.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    rng.shuffle(samples)
    (HERE / "demo.json").write_text(json.dumps(samples, indent=1) + "\n")
    print(f"{len(samples)} samples, {k} images")


if __name__ == "__main__":
    main()
