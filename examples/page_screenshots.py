"""Screenshots of the chat page (docs/page-answer.png, docs/page-grounding.png) from a real edge-serve.

    python examples/page_screenshots.py MODEL_DIR [--out docs]

Starts edge-serve on MODEL_DIR, opens the page in the system's headless
Chromium, asks about a photo, then asks it to locate objects (the page's
"Locate" mode sends a JSON schema, so the answer is grounding-shaped whatever
the weights) and saves both screens. With a random-weight model the words are noise.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.server, support.browser

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from support.browser import ask_on_page, headless_chromium  # noqa: E402
from support.server import ServerProcess  # noqa: E402


def street_scene(width: int = 640, height: int = 480) -> Image.Image:
    """A simple drawn scene: sky, road, a house, a tree and a car."""
    img = Image.new("RGB", (width, height))
    sky = np.linspace([120, 180, 235], [200, 225, 250], height // 2).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(sky[:, None, :], width, 1)), (0, 0))
    d = ImageDraw.Draw(img)
    d.rectangle((0, height // 2, width, height), fill=(96, 160, 80))
    d.rectangle((0, 360, width, 430), fill=(70, 70, 75))
    d.rectangle((60, 150, 260, 330), fill=(205, 170, 120))
    d.polygon([(40, 150), (160, 70), (280, 150)], fill=(160, 50, 40))
    d.rectangle((140, 250, 180, 330), fill=(90, 60, 40))
    d.rectangle((360, 110, 390, 330), fill=(110, 75, 40))
    d.ellipse((310, 40, 440, 180), fill=(40, 120, 50))
    d.rounded_rectangle((430, 340, 600, 400), 12, fill=(200, 30, 40))
    d.rectangle((470, 310, 560, 345), fill=(170, 25, 35))
    for x in (460, 570):
        d.ellipse((x - 18, 385, x + 18, 421), fill=(20, 20, 20))
    return img


def ask(driver, question: str, mode: str, max_tokens: int, image: Path | None) -> None:
    ask_on_page(driver, question, image=image, mode=mode, max_tokens=max_tokens)
    WebDriverWait(driver, 300, poll_frequency=0.1).until(
        lambda d: d.find_element(By.ID, "ask").is_enabled()
        and d.find_elements(By.CSS_SELECTOR, ".message.assistant .figures"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(args.model_dir, ["--parallel", "2", "--ctx-size", "2048"]) as server:
        photo = Path(tmp) / "street.png"
        street_scene().save(photo)
        driver = headless_chromium(1280, 860)
        try:
            driver.get(server.url("/"))
            WebDriverWait(driver, 60).until(lambda d: "model:" in d.find_element(By.ID, "model").text)
            ask(driver, "What is in this picture?", "ask", 40, photo)
            driver.save_screenshot(str(args.out / "page-answer.png"))
            driver.find_element(By.ID, "new-chat").click()
            ask(driver, "house, tree, car", "locate", 120, photo)
            driver.save_screenshot(str(args.out / "page-grounding.png"))
        finally:
            driver.quit()
    print(f"wrote {args.out / 'page-answer.png'} and {args.out / 'page-grounding.png'}")


if __name__ == "__main__":
    main()
