"""The data check `trainer run` makes first and `trainer verify` makes alone: every image read once,
every unreadable file reported at once, and the warnings worth a person's attention.

Unreadable files stop a run before precompute, one line each and a summary, unless --skip-bad,
which trains without them and records them in config.json (`skipped`), data_check.json and the
report. Warnings never stop a run: classes with few images, strong imbalance, duplicates (above all
across training and validation, which inflates every score), images far smaller than the training
size, and files in the data folders that are not used."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.bundle.files import write_atomic
from trainer.audit.duplicates import duplicate_groups
from trainer.audit.scan import Scan, scan_images
from trainer.config import Log, RunConfig
from trainer.data.assemble import data_root, list_data, read_exclude, relative
from trainer.data.loaders import IMAGE_SUFFIXES, DataError, ImageClassifierData

CHECK_FILE = "data_check.json"
MIN_TRAIN = 5  # training images a class needs before it is worth a warning
MIN_VALID = 1
IMBALANCE = 5.0  # the largest class this many times the smallest (training images)
SMALL = 0.5  # an image whose shorter side is under this share of the training size is upscaled 2x+
SHOWN = 5  # files named in a warning's line; data_check.json lists them all
# What operating systems leave in folders: never worth a warning.
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}


@dataclass
class Finding:
    """A warning: what kind, one line for a person, and the files it is about (relative to the data)."""

    kind: str
    message: str
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"warning: {self.message}"


@dataclass
class DataCheck:
    """What the check found: `problems` maps each unreadable file (relative to the data folder) to
    why; `classes` counts the readable images of each class per split."""

    checked: int
    problems: dict[str, str]
    warnings: list[Finding]
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable_by_split: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        """'4 of 36 images cannot be read (train: ants 3, bees 1; valid: bees 1)', or all readable."""
        if not self.problems:
            return f"{self.checked} images checked: all readable"
        where = "; ".join(
            f"{split}: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
            for split, counts in self.unreadable_by_split.items()
            if counts
        )
        return f"{len(self.problems)} of {self.checked} images cannot be read ({where})"

    def problem_lines(self) -> list[str]:
        return [f"  {f}: {why}" for f, why in sorted(self.problems.items())]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> DataCheck:
        return cls(**{**record, "warnings": [Finding(**w) for w in record.get("warnings", [])]})


def check_data(
    data: ImageClassifierData, root: Path, *, size: int, exclude: set[str] | None = None, csv_name: str | None = None
) -> DataCheck:
    """Read every training and validation image of `data` (paths relative to `root`) and find what
    is wrong: unreadable files, and the warnings at `size` pixels. `exclude`: files --exclude
    leaves out of training, left out of the class counts."""
    files = [*data.trn_files, *data.val_files]
    splits = ["train"] * len(data.trn_files) + ["valid"] * len(data.val_files)
    labels = [data.classes[y] for y in [*data.trn_y, *data.val_y]]
    names = [relative(f, root) for f in files]
    scans = scan_images(files, max_pixels=data.max_pixels)
    problems = {n: s.problem for n, s in zip(names, scans, strict=True) if s.problem}
    # Per split and class: the unreadable images, and those training and validation will use.
    unreadable: dict[str, Counter] = {"train": Counter(), "valid": Counter()}
    counts: dict[str, Counter] = {"train": Counter(), "valid": Counter()}
    for n, split, label in zip(names, splits, labels, strict=True):
        if n in problems:
            unreadable[split][label] += 1
        elif not (split == "train" and n in (exclude or set())):
            counts[split][label] += 1
    warnings = [
        *class_warnings(data.classes, counts),
        *duplicate_warnings(scans, names, splits, labels),
        *small_warnings(scans, names, size),
        *unused_warnings(files, root, csv_name),
    ]
    if exclude:
        warnings += exclude_warnings(exclude, set(n for n, s in zip(names, splits, strict=True) if s == "train"))
    return DataCheck(
        checked=len(files),
        problems=problems,
        warnings=warnings,
        classes={split: {c: counts[split][c] for c in data.classes} for split in counts},
        unreadable_by_split={split: dict(c) for split, c in unreadable.items()},
    )


def class_warnings(classes: Sequence[str], counts: dict[str, Counter]) -> list[Finding]:
    """Classes with too few images to learn or to validate, and strong imbalance."""
    found = []
    few = [c for c in classes if counts["train"][c] < MIN_TRAIN]
    if few:
        listed = ", ".join(f"{c} ({counts['train'][c]})" for c in few)
        found.append(
            Finding(
                "few_train",
                f"{len(few)} class(es) have fewer than {MIN_TRAIN} training images: {listed}; the model can hardly "
                "learn them: add images",
            )
        )
    none = [c for c in classes if counts["valid"][c] < MIN_VALID]
    if none:
        found.append(
            Finding(
                "few_valid",
                f"{len(none)} class(es) have no validation image: {', '.join(none)}; their accuracy is not measured",
            )
        )
    present = [counts["train"][c] for c in classes if counts["train"][c]]
    if present and max(present) >= IMBALANCE * min(present):
        big = max(classes, key=lambda c: counts["train"][c])
        small = min((c for c in classes if counts["train"][c]), key=lambda c: counts["train"][c])
        found.append(
            Finding(
                "imbalance",
                f"classes are imbalanced: {big} has {counts['train'][big]} training images, {small} "
                f"{counts['train'][small]} ({counts['train'][big] / counts['train'][small]:.0f}x); accuracy will "
                "favour the large classes: read the confusion matrix, or add images of the small ones",
            )
        )
    return found


def duplicate_warnings(
    scans: Sequence[Scan], names: Sequence[str], splits: Sequence[str], labels: Sequence[str]
) -> list[Finding]:
    """Groups of copies (same bytes, or the same picture resized or re-encoded): across training and
    validation first (leakage), then with different labels, then within a split."""
    groups = duplicate_groups([s.digest if not s.problem else "" for s in scans], [s.phash for s in scans])
    leak, conflict, within = [], [], []
    for g in groups:
        if len({splits[i] for i in g}) > 1:  # each copy's split (a labels CSV keeps both in one folder)
            leak.append([(names[i], f"{splits[i]}, {labels[i]}") for i in g])
        elif len({labels[i] for i in g}) > 1:
            conflict.append([(names[i], labels[i]) for i in g])
        else:
            within.append([(names[i], "") for i in g])
    found = []
    for kind, groups_of, what in (
        (
            "leakage",
            leak,
            "are in both training and validation: the model is scored on pictures it trained on, "
            "which inflates every score; remove one copy of each",
        ),
        ("conflicting_labels", conflict, "carry different labels for the same picture; keep the right one"),
        ("duplicates", within, "are the same picture within one split: it weighs double; remove the copies"),
    ):
        if groups_of:
            shown = "; ".join(
                " = ".join(f"{n} ({note})" if note else n for n, note in g) for g in groups_of[:SHOWN]
            ) + ("; ..." if len(groups_of) > SHOWN else "")
            files = [n for g in groups_of for n, _ in g]
            found.append(Finding(kind, f"{len(groups_of)} group(s) of copies {what}: {shown}", files))
    return found


def small_warnings(scans: Sequence[Scan], names: Sequence[str], size: int) -> list[Finding]:
    small = [n for n, s in zip(names, scans, strict=True) if not s.problem and min(s.width, s.height) < SMALL * size]
    if not small:
        return []
    listed = ", ".join(small[:SHOWN]) + (", ..." if len(small) > SHOWN else "")
    return [
        Finding(
            "small_images",
            f"{len(small)} image(s) have a shorter side under {int(SMALL * size)} px, less than half the training "
            f"size of {size} px: they are upscaled more than 2x and look blurred to the model: {listed}",
            small,
        )
    ]


def unused_warnings(files: Sequence[Path], root: Path, csv_name: str | None) -> list[Finding]:
    """Files beside the dataset's images that it does not use: another format (.heic), or, with a
    labels CSV, images no row names. Hidden and system files are not mentioned."""
    used = {Path(f) for f in files}
    folders = {Path(f).parent for f in files}
    unused = sorted(
        p
        for folder in folders
        for p in folder.iterdir()
        if p.is_file() and p not in used and not p.name.startswith(".") and p.name.lower() not in SYSTEM_FILES
    )
    found = []
    other = [relative(p, root) for p in unused if p.suffix.lower() not in IMAGE_SUFFIXES]
    if other:
        suffixes = ", ".join(sorted({Path(n).suffix.lower() or "(no suffix)" for n in other}))
        found.append(
            Finding(
                "not_read",
                f"{len(other)} file(s) are not read: their suffix ({suffixes}) is none of "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}; convert them to JPEG or PNG to use them: {_listed(other)}",
                other,
            )
        )
    unlabelled = [relative(p, root) for p in unused if p.suffix.lower() in IMAGE_SUFFIXES]
    if unlabelled:
        why = f"no row of {csv_name} names them" if csv_name else "they are in no class folder"
        found.append(
            Finding("unlabelled", f"{len(unlabelled)} image(s) are not used: {why}: {_listed(unlabelled)}", unlabelled)
        )
    return found


def exclude_warnings(exclude: set[str], train: set[str]) -> list[Finding]:
    other = sorted(exclude - train)
    if not other:
        return []
    return [
        Finding(
            "exclude",
            f"{len(other)} file(s) in --exclude are not training images and stay where they are (validation keeps "
            f"its images): {_listed(other)}",
            other,
        )
    ]


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check(cfg: RunConfig, run_dir: Path, log: Log = print) -> DataCheck:
    """The data check of a configuration: every problem and warning logged, one line each."""
    root = data_root(cfg, run_dir)
    size = cfg.train_sizes[-1]
    data = list_data(cfg, cfg.train_sizes[0], run_dir)
    exclude = read_exclude(cfg.exclude, root) if cfg.exclude else None
    result = check_data(data, root, size=size, exclude=exclude, csv_name=cfg.csv)
    for line in result.problem_lines():
        log(line)
    log(result.summary())
    for finding in result.warnings:
        log(finding.line())
    if exclude:
        log(f"--exclude: {len(exclude & {relative(f, root) for f in data.trn_files})} image(s) left out of training")
    return result


def stop(result: DataCheck) -> DataError:
    """The error that stops a run (and `trainer verify`) with unreadable files."""
    return DataError(
        f"{result.summary()}; fix or remove them (one line each above), or pass --skip-bad to train without them"
    )


def verify(cfg: RunConfig, log: Log = print) -> DataCheck:
    """`trainer verify`: the data check alone; unreadable files raise DataError after every line is logged."""
    result = check(cfg, cfg.out, log)
    if result.problems:
        raise stop(result)
    return result


def checked_config(cfg: RunConfig, run_dir: Path, log: Log = print) -> RunConfig:
    """The check `trainer run` makes first: the configuration to train with, `skipped` naming the
    unreadable files when --skip-bad lets the run go on without them (DataError otherwise). Writes
    run_dir/data_check.json for the report."""
    result = check(cfg, run_dir, log)
    if result.problems and not cfg.skip_bad:
        raise stop(result)
    if result.problems:
        log(f"--skip-bad: training without the {len(result.problems)} unreadable image(s) (config.json: skipped)")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(run_dir) / CHECK_FILE, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    return cfg.model_copy(update={"skipped": dict(result.problems) if cfg.skip_bad else {}})


def read_check(run_dir: Path) -> DataCheck | None:
    """The check a run made (data_check.json), None for a run from before checks existed."""
    path = Path(run_dir) / CHECK_FILE
    try:
        return DataCheck.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
