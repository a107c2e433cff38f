"""`trainer demo`: the embedded digits end to end, trainer and server at once: train, export,
serve on a free loopback port, predict through gRPC and compare with the trainer's own scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trainer.config import RunConfig
from trainer.recipe import run


def demo_config(out: Path) -> RunConfig:
    """Small settings that train the digits on a 2-core CPU in about a minute. Digits are never
    flipped (a mirrored 2 is not a 2): rotation, lighting and zoom only."""
    return RunConfig(out=out, size=64, crop_pct=1.0, aug="basic", bs=64, head_epochs=3, aug_cycles=1, unfreeze_cycles=0)


def served_accuracy(target: str, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str]):
    """Accuracy of a running server on image files, and its replies."""
    from serving.client import Client

    with Client(target) as client:
        replies = [client.predict_file(f, top_k=1) for f in files]
    hits = [classes.index(r.predictions[0].label) == y for r, y in zip(replies, labels, strict=True)]
    return float(np.mean(hits)), replies


def one_per_class(labels: Sequence[int], n: int) -> list[int]:
    """Indices of up to n items taking the classes in turn (the first of each class, then the
    second of each, ...), so that a short sample shows every class rather than the first one's."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    picked: list[int] = []
    for rank in range(max((len(v) for v in by_class.values()), default=0)):
        picked += [v[rank] for _, v in sorted(by_class.items()) if rank < len(v)]
    return picked[:n]


def demo(out: Path, show: int = 8, log: Callable[[str], None] = print) -> float:
    """Run the demo in `out`; return the served accuracy on the validation images."""
    from serving.config import ServerConfig
    from serving.server import Server

    cfg = demo_config(Path(out))
    learn, metrics = run(cfg, log)
    assert learn is not None, "one process: run returns its learner"
    server = Server(ServerConfig(bundle=cfg.out / "bundle", port=0, metrics_port=None))
    try:
        target = f"127.0.0.1:{server.port}"
        data = learn.data
        acc, replies = served_accuracy(target, data.val_files, data.val_y, data.classes)
        log(f"\nserver on {target}, a few of its predictions:")
        for i in one_per_class(data.val_y, show):
            p, truth = replies[i].predictions[0], data.classes[data.val_y[i]]
            mark = "ok" if p.label == truth else "WRONG"
            log(
                f"  {data.val_files[i].relative_to(cfg.out)}: true {truth}, predicted {p.label} "
                f"({p.probability:.3f}, {len(replies[i].tta_views)} TTA views) {mark}"
            )
        views = len(replies[0].tta_views) if replies else 0
        served = f"{'with' if views > 1 else 'without'} TTA, the bundle's default"
        log(
            f"\naccuracy on {len(replies)} validation images: served {acc:.4f} ({served}); "
            f"trainer with TTA {metrics['accuracy_tta']:.4f}, without TTA {metrics['accuracy']:.4f}"
        )
        log(f"bundle: {cfg.out / 'bundle'}  (serve it: serving serve --bundle {cfg.out / 'bundle'})")
    finally:
        server.stop(0)
    return acc
