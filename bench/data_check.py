"""The data check's speed and its duplicate threshold, on the shared photos (issue 28).

    python bench/data_check.py                  # hymenoptera and catbreeds, about a minute on 2 cores
    python bench/data_check.py --rounds 5

1. Speed: trainer.audit.scan.scan_images (every file decoded, JPEGs at reduced scale, hashed)
   against the baseline of decoding every file in full as training reads it
   (trainer.data.loaders.read_image), on the same threads, in interleaved rounds.
2. The perceptual hash: each photo's distance in bits to its nearest other photo of the set, and
   to copies made of every 10th photo (half size at JPEG quality 75; a 90% centre crop); NEAR_BITS
   must lie above the resized copies and below different photos. Crops move a DCT hash further:
   how many are found is printed, not promised.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.audit.duplicates import NEAR_BITS, distances, duplicate_groups  # noqa: E402
from trainer.audit.scan import phash, scan_images  # noqa: E402
from trainer.config import MAX_TRAIN_PIXELS  # noqa: E402
from trainer.data.loaders import IMAGE_SUFFIXES, read_image  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def photos(folder: Path) -> list[Path]:
    # Not the caches of resized copies (tmp/ beside the data).
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "tmp" not in p.relative_to(folder).parts
    )


def full_decode(files: list[Path], workers: int) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(read_image, files))


def speed(files: list[Path], rounds: int, workers: int) -> None:
    times: dict[str, list[float]] = {"check (scan_images)": [], "full decode (read_image)": []}
    for _ in range(rounds):  # interleaved: these machines drift within a minute
        for name, work in (
            ("check (scan_images)", lambda: scan_images(files, max_pixels=MAX_TRAIN_PIXELS, workers=workers)),
            ("full decode (read_image)", lambda: full_decode(files, workers)),
        ):
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    print(f"\n{len(files)} photos, {workers} threads, median of {rounds} interleaved rounds")
    print("| reader | seconds | images/s |")
    print("| --- | --- | --- |")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.2f} | {len(files) / m:.0f} |")
    ratio = statistics.median(times["full decode (read_image)"]) / statistics.median(times["check (scan_images)"])
    print(f"ratio: the check takes 1/{ratio:.1f} of a full decode of the same files")


def copies(im: Image.Image) -> dict[str, Image.Image]:
    half = im.resize((max(1, im.width // 2), max(1, im.height // 2)))
    buf = io.BytesIO()
    half.save(buf, "JPEG", quality=75)
    w, h = im.size
    crop = im.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    return {"half size, JPEG q75": Image.open(io.BytesIO(buf.getvalue())), "90% centre crop": crop}


def hashes(files: list[Path]) -> None:
    scans = scan_images(files, max_pixels=MAX_TRAIN_PIXELS)
    ok = [s for s in scans if s.phash is not None]
    hashed = [s.phash for s in ok if s.phash is not None]
    groups = duplicate_groups([s.digest for s in ok], hashed)
    in_group = {i for g in groups for i in g}
    nearest = distances(hashed)
    apart = [int(d) for i, d in enumerate(nearest) if i not in in_group]
    print(f"\nperceptual hash, NEAR_BITS = {NEAR_BITS}: {len(ok)} photos, {len(groups)} groups of copies found")
    print("| pair | n | distance in bits: min | median | max |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| photo and its nearest other, outside the groups | {len(apart)} | {min(apart)} | "
        f"{statistics.median(apart):.0f} | {max(apart)} |"
    )
    within = [int(d) for i, d in enumerate(nearest) if i in in_group]
    if within:
        print(
            f"| photo and its nearest copy, inside the groups | {len(within)} | {min(within)} | "
            f"{statistics.median(within):.0f} | {max(within)} |"
        )
    made: dict[str, list[int]] = {}
    for s in ok[::10]:
        with Image.open(s.path) as im:
            for name, copy in copies(im.convert("RGB")).items():
                h = phash(copy)
                if h is not None and s.phash is not None:
                    made.setdefault(name, []).append(bin(h ^ s.phash).count("1"))
    for name, d in made.items():
        print(f"| photo and its {name} | {len(d)} | {min(d)} | {statistics.median(d):.0f} | {max(d)} |")
    closest = min(apart)
    widest = max(made["half size, JPEG q75"])
    print(
        f"ratio: NEAR_BITS {NEAR_BITS} lies above every resized copy ({widest}) and below every other photo "
        f"({closest}): {'yes' if widest <= NEAR_BITS < closest else 'NO'}; crops found: "
        f"{sum(d <= NEAR_BITS for d in made['90% centre crop'])} of {len(made['90% centre crop'])}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=SHARED, help="folder searched for photos (default: ../shared/data)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    files = photos(args.photos)
    if not files:
        print(f"no photos under {args.photos}: this benchmark needs ../shared/data", file=sys.stderr)
        return 1
    np.random.seed(0)
    speed(files, args.rounds, args.workers)
    hashes(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
