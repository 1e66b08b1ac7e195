"""The command line: ``python -m core <command>``.

Commands: ``demo``, ``jobs``, ``import``, ``train``, ``models``, ``predict``, ``mosaic``, ``clip``, ``heatmaps``,
``users``, ``studies``, ``analyze``, ``audit``, ``evaluate-localization``, ``agreement``, ``synth``,
``localization-study``, ``compare-models``. Errors a user can fix are printed as one ``error: ...`` line with exit
status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from core.data.io import FileError, Image, ImageError, read_image
from core.data.localization_set import KINDS
from core.data.preprocess import display_image
from core.heatmaps import list_methods, method_title
from core.heatmaps.mosaic import MODES
from core.heatmaps.render import to_uint8
from core.models import check_model_options, model_options
from core.models import list_models as list_architectures
from core.predict import Predictor, write_heatmap_files
from core.settings import workspace_dir
from core.stats.ratings import RATING_SCALES
from core.stats.thresholds import POLICIES
from core.train import DECISIONS, RECIPES, TASKS, TrainConfig
from db import repo
from db.models import MODALITIES, ROLES
from db.session import init_db, session_scope
from services.localization import MOSAIC_STUDIES, study_titles

__all__ = ["main"]


class UsageError(Exception):
    """A problem the user can fix; printed as ``error: ...``, exit status 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import (
        DEMO_USERS,
        DemoConfig,
        build_demo,
        demo_ready,
        ensure_demo_clips,
        ensure_demo_localization,
        ensure_demo_regions,
        ensure_demo_study,
        workspace_has_data,
    )

    if args.if_missing and (demo_ready() or workspace_has_data()):
        if demo_ready():
            ensure_demo_study()  # demo workspaces built before reader studies existed get theirs
            ensure_demo_localization()  # ... and before the localisation models, their MLCAM-LICI table
            ensure_demo_clips()  # ... and before clips, two triaged synthetic clips
            ensure_demo_regions()  # ... and before regions studies, theirs
        print(f"workspace {workspace_dir()} is ready")
    else:
        build_demo(DemoConfig(patients=args.patients, epochs=args.epochs, image_size=args.image_size, seed=args.seed))
    if demo_ready():
        print("demo sign-in (username / password):")
        for username, password, role, _ in DEMO_USERS:
            print(f"  {role:<10} {username} / {password}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from services.importer import import_manifest

    manifest = Path(args.manifest) if args.manifest else Path(args.folder) / "manifest.csv"
    if not manifest.is_file():
        raise UsageError(f"{manifest} not found; give the manifest with --manifest")
    report = import_manifest(manifest, fractions=tuple(args.split), seed=args.seed)
    clips = f" (frames of {report.clips} clips)" if report.clips else ""
    print(f"imported {report.specimens} specimens, {report.images} images{clips} into {workspace_dir()}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if report.errors else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from services.training import default_name, print_progress, train_and_register

    options = dict(_key_values(args.model_option or [], "--model-option"))
    if args.dropout is not None:
        if "drop_rate" in options:
            raise UsageError("give the dropout as --dropout or as --model-option drop_rate=..., not both")
        options["drop_rate"] = args.dropout
    if args.weight_decay is not None and not 0.0 <= args.weight_decay < 1.0:
        raise UsageError(f"--weight-decay must lie in [0, 1), not {args.weight_decay}")
    if not 0.0 <= args.noise < 1.0:
        raise UsageError(f"--noise is a grey-level SD on the [0, 1] scale: give a number in [0, 1), not {args.noise}")
    if not 0.0 <= args.blur < 64.0:
        raise UsageError(f"--blur is an SD in px: give a number in [0, 64), not {args.blur}")
    config = TrainConfig(
        architecture=args.architecture,
        task=args.task,
        modality=args.modality,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        model_kwargs=check_model_options(args.architecture, options),
        threshold_policy=args.policy,
        seed=args.seed,
        device=args.device,
        pretrained_file=args.pretrained_file,
        recipe=args.recipe,
        noise=args.noise,
        blur=args.blur,
    )
    if args.data and args.mosaics:
        raise UsageError("give --data (a localisation set) or --mosaics (RCM mosaics with masks), not both")
    if args.mosaics:
        from services.mosaic import read_mosaic_folder, train_patch_classifier

        config = replace(config, task="aspecific", modality="RCM")
        name = args.name or default_name(config)
        train_patch_classifier(
            config,
            read_mosaic_folder(args.mosaics),
            name=name,
            patches_per_mosaic=args.patches,
            seed=args.seed,
            context=args.context,
            padded_fraction=args.padded_fraction,
            progress=print_progress,
        )
        return 0
    if args.context or args.padded_fraction:
        raise UsageError("--context and --padded-fraction train a patch classifier on RCM mosaics: give --mosaics")
    if args.data:
        from core.data.localization_set import read_set
        from services.localization import train_on_set

        train_on_set(config, read_set(args.data), name=args.name, progress=print_progress)
        return 0
    train_and_register(config, name=args.name, progress=print_progress)
    return 0


def _key_values(items: Sequence[str], flag: str) -> list[tuple[str, object]]:
    """``KEY=VALUE`` pairs of a repeatable flag; a value is read as JSON when it parses (``0.75``, ``true``,
    ``"cbam"``), else kept as text (``cbam``)."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} takes KEY=VALUE, not {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def _cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic localisation set (images, image-level labels, masks) for ``train --data``."""
    from core.data.localization_set import generate_set

    if args.kind == "rcm":
        from core.data.synth_rcm import write_mosaic_folder

        written = write_mosaic_folder(
            Path(args.out),
            counts=tuple(args.counts or (6, 1, 2)),
            size=args.size or 512,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"rcm mosaics -> {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in written.items()))
        return 0
    data = generate_set(
        args.kind,
        Path(args.out),
        counts=tuple(args.counts or (400, 100, 200)),
        size=args.size or 128,
        channels=args.channels,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    described = data.describe()
    splits = ", ".join(f"{k} {v['images']} ({v['positive']} positive)" for k, v in described["splits"].items())
    print(f"{args.kind} set -> {args.out}: {splits}; masks: {', '.join(data.mask_sets)}")
    return 0


_STUDY_COLUMNS = ("image_auc", "pixel_auc", "best_dice", "mean_acc", "mean_iu", "fw_iu", "precision", "recall")
_STUDY_HEADERS = ("imgAUC", "pxAUC", "Dice*", "mAcc", "mIU", "fwIU", "prec", "rec")
# columns only some studies' rows have (seed 004's Dice per spot and spot ROC, seed 001's slide FROC): shown when
# a row of the table has them
_STUDY_EXTRAS = {
    "dice_spot_mean": "DiceSp",
    "dice_spot_sd": "SD",
    "spot_auc": "spAUC",
    "froc": "FROC",
    "patch_accuracy": "pAcc",
}


def _cmd_localization_study(args: argparse.Namespace) -> int:
    """Train a seed model, its ablations and a ResNet-18 baseline; score their maps; store the table."""
    from services.localization import run_mosaic_study, run_study

    counts = tuple(args.counts) if args.counts else None
    overrides: dict[str, dict[str, object]] = {}
    for key, value in _key_values(args.set or [], "--set"):
        model, dot, name = key.partition(".")
        if not dot or not model or not name:
            raise UsageError(f"--set takes MODEL.FIELD=VALUE (e.g. main.lr=0.05), not {key}={value}")
        overrides.setdefault(model, {})[name] = value
    from services.localization import check_overrides

    common = {
        "counts": counts,
        "size": args.size,
        "epochs": args.epochs,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "overrides": check_overrides(args.study, overrides),
    }
    if args.study in MOSAIC_STUDIES:
        if args.data or args.channels or args.models:
            raise UsageError(
                f"the {args.study} study draws its mosaics from --seed; --data, --channels and --models do not apply"
            )
        report = run_mosaic_study(
            args.study, window=args.window, patches=args.patches, slow_step=args.scorecam_step, **common
        )
    else:
        if args.window or args.patches or args.scorecam_step:
            mosaic = ", ".join(MOSAIC_STUDIES)
            raise UsageError(f"--window, --patches and --scorecam-step apply to the mosaic studies only ({mosaic})")
        report = run_study(args.study, data_dir=args.data, channels=args.channels, models=args.models, **common)

    def shown(value: float | None) -> str:
        return "  -  " if value is None else f"{value:.3f}"

    for table in report["tables"]:
        named = f"{table['set']} ({table['split']}), " if table.get("set") else ""
        print(f"\n{report['title']}: {named}{table['mask_set']} masks, threshold {table['threshold']:g}")
        extras = {k: h for k, h in _STUDY_EXTRAS.items() if any(k in row for row in table["rows"])}
        columns, headers = (*_STUDY_COLUMNS, *extras), (*_STUDY_HEADERS, *extras.values())
        width = max(32, *(len(row["row"]) for row in table["rows"]))
        print(f"{'':<{width}} " + " ".join(f"{h:>6}" for h in headers))
        for row in table["rows"]:
            print(f"{row['row']:<{width}} " + " ".join(f"{shown(row.get(k)):>6}" for k in columns))
    if report.get("classification"):
        print("\nclassification (test split, threshold chosen on validation):")
        for row in report["classification"]:
            accuracy, auc = shown(row["test_accuracy"]), shown(row["test_auc"])
            print(f"  {row['name']:<48} accuracy {accuracy}  AUC {auc}  {row['parameters']:>10,} parameters")
    print(f"\nstored as evaluation {report['evaluation_id']} of {report['models']['main']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, allow_nan=False))
        print(f"report -> {args.out}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    init_db()
    with session_scope() as session:
        models = repo.list_models(session, task=args.task, modality=args.modality)
    rows = [m.summary() for m in models]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no models registered; train one with `python -m core train` or build the demo")
    else:
        for r in rows:
            auc = f"{r['test_auc']:.3f}" if r["test_auc"] is not None else "-"
            line = f"{r['id']:>4}  {r['name']:<40} {r['task']:<6} {r['modality']:<3}"
            print(f"{line} threshold {r['threshold']:.3f}  test AUC {auc}")
    return 0


def _choose_model(name_or_id: str | None, task: str) -> repo.ModelInfo:
    init_db()
    with session_scope() as session:
        if name_or_id:
            model = repo.find_model(session, name_or_id)
            if model is None:
                raise UsageError(f"no registered model {name_or_id!r}; see `python -m core models`")
            return model
        models = repo.list_models(session, task=task)
    if not models:
        raise UsageError(f"no model registered for task {task!r}; train one or build the demo")
    if len(models) > 1:
        names = ", ".join(m.name for m in models)
        raise UsageError(f"{len(models)} models are registered for task {task!r} ({names}); choose one with --model")
    return models[0]


def _unique_stems(files: Sequence[str]) -> list[str]:
    """An output name per input file, never two alike: the file's stem, or ``stem-2``, ``stem-3``... when that name
    is taken, whether by an earlier file of the same stem or by one whose own stem is ``stem-2``."""
    taken = {Path(file).stem or "image" for file in files}
    used: set[str] = set()
    stems = []
    for file in files:
        stem = candidate = Path(file).stem or "image"
        number = 1
        while candidate in used or (number > 1 and candidate in taken):
            number += 1
            candidate = f"{stem}-{number}"
        used.add(candidate)
        stems.append(candidate)
    return stems


def _cmd_predict(args: argparse.Namespace) -> int:
    model = _choose_model(args.model, args.task)
    method = None if args.heatmap == "none" else args.heatmap
    predictor = Predictor.from_checkpoint(
        workspace_dir() / model.checkpoint_path, model.threshold, sha256=model.checkpoint_sha256, device=args.device
    )
    if method is not None and method not in predictor.methods:
        raise UsageError(
            f"heatmap {method!r} does not apply to model {model.name}; use one of: {', '.join(predictor.methods)}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    refused = 0
    for file, stem in zip(args.files, _unique_stems(args.files), strict=True):
        try:
            image = read_image(file, file)
            (result,) = predictor.diagnose([image], heatmap=method)
            if isinstance(result, ImageError):
                raise result
        except ImageError as error:
            print(f"error: {file}: {error.reason}", file=sys.stderr)
            refused += 1
            continue
        record = {
            "file": file,
            "model": model.name,
            "model_id": model.id,
            "task": model.task,
            "modality": model.modality,
            "probability": result.probability,
            "threshold": result.threshold,
            "threshold_policy": model.threshold_policy,
            "decision": result.decision,
            "label": DECISIONS[model.task][int(result.decision)],
            "device": result.device,
            "seconds": result.seconds,
            "heatmap": None,
        }
        if result.heatmap is not None:
            paths = write_heatmap_files(image, model.modality, result.heatmap, out, stem, extras=result.extras)
            record["heatmap"] = {"method": method, **paths}
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        print(f"{file}: p={result.probability:.3f} (threshold {result.threshold:.3f}) -> {record['label']}")
    return 2 if refused else 0


def _cmd_mosaic(args: argparse.Namespace) -> int:
    from core.data.io import MOSAIC_MAX_PIXELS
    from core.heatmaps import colorize
    from core.heatmaps.render import overlay
    from services.mosaic import mosaic_array

    model = _choose_model(args.model, "aspecific")
    predictor = Predictor.from_checkpoint(
        workspace_dir() / model.checkpoint_path, model.threshold, sha256=model.checkpoint_sha256, device=args.device
    )
    try:
        image = read_image(args.file, args.file, max_pixels=MOSAIC_MAX_PIXELS)
        mosaic = mosaic_array(image, model.modality)
    except ImageError as error:
        raise UsageError(f"{args.file}: {error.reason}") from None
    sigma = None if args.sigma <= 0 else args.sigma

    def report(done: int, total: int) -> None:
        print(f"  {done}/{total}", end="\n" if done == total else "\r", file=sys.stderr, flush=True)

    result = predictor.stitch(
        mosaic,
        step=args.step,
        sigma=sigma,
        mode=args.mode,
        method=args.heatmap,
        batch_size=args.batch_size,
        progress=report,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.file).stem or "mosaic"
    np.save(out / f"{stem}.npy", result.map.astype(np.float16 if args.float16 else np.float32))
    shown = PILImage.fromarray((mosaic * 255).astype(np.uint8))
    shown.thumbnail((4096, 4096))
    small = np.asarray(shown).astype(np.float32) / 255.0
    heat = np.asarray(PILImage.fromarray(result.map).resize(shown.size, PILImage.Resampling.BILINEAR))
    PILImage.fromarray(colorize(np.clip(heat, 0, 1))).save(out / f"{stem}_heatmap.png")
    PILImage.fromarray(overlay(small, np.clip(heat, 0, 1), 0.45)).save(out / f"{stem}_overlay.png")
    probabilities = result.window_probabilities
    record = {
        "file": args.file,
        "model": model.name,
        "method": result.method,
        "mode": result.mode,
        "window": result.window,
        "step": result.step,
        "sigma": result.sigma,
        "windows": int(probabilities.size),
        "max_window_probability": float(probabilities.max()),
        "positive_windows": float((probabilities >= model.threshold).mean()),
        "threshold": model.threshold,
        "device": result.device,
        "seconds": result.seconds,
        "map": str(out / f"{stem}.npy"),
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(
        f"{args.file}: {record['windows']} windows of {result.window} px (step {result.step}), "
        f"max p={record['max_window_probability']:.3f}, {record['positive_windows']:.1%} above threshold "
        f"{model.threshold:.3f}; {result.mode} {result.method} on {result.device} in {result.seconds:.1f} s"
    )
    return 0


def _cmd_clip(args: argparse.Namespace) -> int:
    from core.data.clips import open_clip
    from core.triage import default_method, frames_csv, triage_clip

    model = _choose_model(args.model, "diagnostic")
    predictor = Predictor.from_checkpoint(
        workspace_dir() / model.checkpoint_path, model.threshold, sha256=model.checkpoint_sha256, device=args.device
    )
    own = default_method(predictor.methods, model.architecture)
    method = {"none": None, "default": own}.get(args.heatmap, args.heatmap)
    if method is not None and method not in predictor.methods:
        raise UsageError(
            f"heatmap {method!r} does not apply to model {model.name}; use one of: {', '.join(predictor.methods)}"
        )
    if args.top < 0 or args.batch_size < 1:
        raise UsageError("--top must be 0 or more and --batch-size at least 1")

    def report(done: int, total: int | None) -> None:
        if done % (args.batch_size * 25) == 0 or done == total:
            print(f"  {done:,} of {total:,} frames" if total else f"  {done:,} frames", file=sys.stderr, flush=True)

    try:
        with open_clip(args.file, args.file) as clip:
            triage = triage_clip(
                predictor, clip, batch_size=args.batch_size, top_k=args.top, heatmap=method, progress=report
            )
    except FileError as error:  # the clip, or one of its frames
        print(f"error: {args.file}: {error.reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frames.csv").write_text(frames_csv(triage.probabilities, triage.threshold))
    top = []
    for frame in triage.top:
        stem = f"frame-{frame.index:06d}"
        image = Image(np.ascontiguousarray(frame.frame), name=stem, format="NPY")
        PILImage.fromarray(to_uint8(display_image(image, model.modality))).save(out / f"{stem}.png")
        paths = {"frame": str(out / f"{stem}.png")}
        if frame.heatmap is not None:
            paths |= write_heatmap_files(image, model.modality, frame.heatmap, out, stem)
        top.append({"frame": frame.index, "probability": frame.probability, **paths})
    summary = {
        "file": args.file,
        "model": model.name,
        "model_id": model.id,
        "frames": triage.n_frames,
        "fps": triage.fps,
        "threshold": triage.threshold,
        "diagnostic_frames": triage.n_positive,
        "heatmap": triage.method,
        "top": top,
        "device": triage.device,
        "seconds": triage.seconds,
    }
    (out / "clip.json").write_text(json.dumps(summary, indent=2))
    negative, positive = DECISIONS[model.task]
    print(
        f"{args.file}: {triage.n_frames:,} frames, {triage.n_positive:,} {positive} at threshold "
        f"{triage.threshold:.3f} ({triage.frames_per_second:.1f} frames/s on {triage.device}); "
        f"top frames: {', '.join(f'{f.index} (p={f.probability:.3f})' for f in triage.top) or 'none'}"
    )
    return 0


def _cmd_heatmaps(_args: argparse.Namespace) -> int:
    for name, summary in list_methods().items():
        print(f"{name:<16} {method_title(name):<24} {summary}")
    print("use one with `python -m core predict --heatmap NAME`; whole mosaics: `python -m core mosaic`")
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    """List accounts, add one (password policy checked), or deactivate, reactivate, re-role, reset or unlock one;
    every change is audited (as done from the command line)."""
    from services import accounts

    init_db()
    if args.action == "list":
        for row in accounts.list_accounts():
            user = row.user
            flags = [
                text
                for text, on in (
                    ("never signs in", not user.can_sign_in),
                    ("inactive", user.can_sign_in and not user.active),
                    ("must change password", user.must_change_password),
                    (f"sign-in locked until {row.locked_until:%H:%M} UTC" if row.locked_until else "", True),
                )
                if on and text
            ]
            note = f"  [{', '.join(flags)}]" if flags else ""
            print(f"{user.id:>4}  {user.username:<20} {user.role:<10} {user.display_name}{note}")
        return 0
    if args.action == "add":
        username = args.username or args.target
        if not username or not args.password:
            raise UsageError("users add needs --username and --password")
        user = accounts.add_user(username, args.password, args.role or "reader", args.display_name or "")
        print(f"added {user.role} {user.username} (id {user.id})")
        return 0
    if not args.target:
        raise UsageError(f"users {args.action} needs the USERNAME (see `python -m core users list`)")
    if args.action == "deactivate":
        accounts.deactivate(args.target)
        print(f"deactivated {args.target}; its open sessions end")
    elif args.action == "activate":
        accounts.activate(args.target)
        print(f"activated {args.target}")
    elif args.action == "role":
        if not args.role:
            raise UsageError(f"users role needs --role ({', '.join(ROLES)})")
        user = accounts.set_role(args.target, args.role)
        print(f"{user.username} now has the {user.role} role; its open sessions end")
    elif args.action == "reset":
        password = accounts.reset_password(args.target, password=args.password)
        if args.password is None:
            print(f"temporary password for {args.target} (shown only now): {password}")
        print(f"{args.target} must set a new password at the next sign-in; its open sessions end")
    else:
        was_locked = accounts.unlock(args.target)
        print(f"sign-in for {args.target} unlocked" + ("" if was_locked else " (it was not locked)"))
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    """List reader studies, export their reads (and truth, and a model's scores), or import reads collected
    elsewhere. Files are written through ``core.text.csv_bytes`` (escaped against spreadsheet formulas)."""
    from core.text import csv_bytes
    from services import exports, studies

    init_db()
    if args.action == "list":
        with session_scope() as session:
            for study in studies.list_studies(session):
                flags = " simulated" if study.simulated else ""
                print(
                    f"{study.id:>4}  {study.title:<40} {study.status:<6} {study.n_cases:>5} cases  "
                    f"{len(study.arms)} arms  {len(study.reader_ids)} readers{flags}"
                )
        return 0
    if args.study is None:
        raise UsageError(f"studies {args.action} needs the study id (see `python -m core studies list`)")
    if args.action == "export":
        if not args.out:
            raise UsageError("studies export needs --out FILE.csv")
        if (args.arm or args.model) and not args.predictions:
            raise UsageError("--arm and --model choose what --predictions FILE.csv writes; add --predictions")
        reads = exports.reads_export(args.study, user_id=None, history=args.history)
        cases = exports.cases_export(args.study, user_id=None) if args.cases else None
        Path(args.out).write_bytes(csv_bytes(reads))
        print(f"{len(reads)} reads -> {args.out}")
        if cases is not None:
            Path(args.cases).write_bytes(csv_bytes(cases))
            print(f"{len(cases)} cases with truth -> {args.cases}")
        if args.predictions:
            from services.results import export_predictions

            scores, model = export_predictions(args.study, args.arm, model=args.model, user_id=None)
            Path(args.predictions).write_bytes(csv_bytes(scores))
            arm = f" --arm {args.arm}" if args.arm else ""
            print(
                f"{len(scores)} {model.name} scores -> {args.predictions}; the Results page's analysis at the model's "
                f"registered threshold: python -m core analyze --predictions {args.predictions} --reads {args.out}"
                f"{arm} --threshold {float(model.threshold)!r} --out report.json"
            )
        return 0
    if args.action == "export-masks":
        if not args.out:
            raise UsageError("studies export-masks needs --out DIR (written as DIR/<reader>/<case>.png)")
        with session_scope() as session:
            summary = studies.export_masks(
                session, args.study, args.out, user_id=None, arm=args.arm, layer=args.layer, coco=args.coco
            )
        print(
            f"{summary['masks']} masks of {len(summary['readers'])} readers (arm {summary['arm']}, layer "
            f"{summary['layer']}) -> {args.out}" + (f"; every drawing as COCO RLE -> {args.coco}" if args.coco else "")
        )
        return 0
    if not args.file:
        raise UsageError("studies import needs --file READS.csv")
    with session_scope() as session:
        report = studies.import_reads(
            session,
            args.study,
            Path(args.file).read_bytes(),
            user_id=None,
            create_readers=args.create_readers,
            allow_active_readers=args.as_active_readers,
        )
    if report.errors:
        for error in report.errors:
            print(f"  {error}", file=sys.stderr)
        raise UsageError(f"nothing imported: {len(report.errors)} problem(s) in {report.rows} row(s); fix the file")
    created = ", ".join(report.created_readers)
    print(f"imported {report.imported} reads" + (f"; new inactive reader accounts: {created}" if created else ""))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    """CNN against readers from CSVs (Table 1 with bootstrap CIs and paired tests), or the MRMC analysis."""
    from core.stats.report import analyze_mrmc, analyze_reads, jsonable, read_predictions, read_ratings, read_reads

    if args.mrmc:
        if not args.ratings:
            raise UsageError("--mrmc needs --ratings R.csv (columns reader, modality, case, truth, rating)")
        report = {"mrmc": analyze_mrmc(read_ratings(args.ratings), cov=args.cov)}
    else:
        if not args.predictions or not args.reads:
            raise UsageError("analyze needs --predictions P.csv and --reads R.csv (or --ratings R.csv --mrmc)")
        predictions = read_predictions(args.predictions)
        reads = read_reads(args.reads, predictions["case_id"], rating_scale=args.rating_scale, arm=args.arm)
        report = analyze_reads(
            predictions,
            reads,
            threshold=args.threshold,
            policy=args.policy,
            bootstrap=args.bootstrap,
            permutations=args.permutations,
            seed=args.seed,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(jsonable(report), indent=2, allow_nan=False))
    print(f"report -> {args.out}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    """Walk the hash chains of the audit log and the reads (``db.chain``); check heads recorded earlier."""
    from db.chain import verify
    from db.session import read_scope

    init_db()
    with read_scope() as session:
        reports = verify(session)
        known = {args_head: None for args_head in args.head}
        if known:
            from db.chain import CHAINED, GENESIS, chain_rows

            if GENESIS in known:  # the head of a chain that was empty then: the start of every chain
                known[GENESIS] = ("an empty chain's start", 0)
            connection = session.connection()
            for table in CHAINED:
                for row in chain_rows(connection, table):
                    if row["row_hash"] in known:
                        known[row["row_hash"]] = (table, row["id"])
    problems = []
    for report in reports:
        if report.ok:
            print(f"{report.table}: {report.rows} rows, chain intact; head {report.head}")
        else:
            problems.append(f"{report.table}: the chain breaks at row id {report.broken_at}: {report.reason}")
    for head, found in known.items():
        if found is None:
            problems.append(f"head {head} recorded earlier is not in any chain: history before it was rewritten")
        else:
            print(f"head {head} recorded earlier: still {found[0]} row id {found[1]}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print("keep the heads above somewhere outside this machine; `audit verify --head HASH` checks them later")
    return 2 if problems else 0


def _cmd_evaluate_localization(args: argparse.Namespace) -> int:
    """Score heatmaps against expert masks (pixel AUC, Dice sweep, FCN scores, 75 % region rule) into a JSON report."""
    from core.metrics.localization import evaluate_localization

    report = evaluate_localization(
        args.maps, args.masks, threshold=args.threshold, bootstrap=args.bootstrap, seed=args.seed
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, allow_nan=False))

    def shown(value: float | None, spec: str = ".3f") -> str:
        return "undefined" if value is None else format(value, spec)

    dice, at = report["dice"], report["at_threshold"]
    print(
        f"{report['n_images']} images, {report['n_labeled_pixels']} labeled pixels: "
        f"pixel AUC {shown(report['pixel_auc']['estimate'])}, best Dice {shown(dice['dice'])} "
        f"(threshold {shown(dice['best_threshold'], 'g')}), "
        f"mean IU {shown(at['mean_iu'])} (threshold {at['threshold']:g})"
    )
    print(f"report -> {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the demo workspace (synthetic cohort, FL-CNN and WL-CNN, users)")
    demo.add_argument("--if-missing", action="store_true", help="do nothing when a workspace already exists")
    demo.add_argument("--patients", type=int, default=16)
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)

    from services.agreement_cli import add_parser as add_agreement_parser
    from services.jobs.cli import add_parser as add_jobs_parser
    from services.model_compare_cli import add_parser as add_compare_models_parser

    add_jobs_parser(sub)

    imp = sub.add_parser("import", help="import a folder of images with a CSV manifest")
    imp.add_argument("folder", help="folder holding the images (and manifest.csv unless --manifest is given)")
    imp.add_argument("--manifest", help="CSV: patient_id, specimen_id, modality, path, tumor, grade, ki67, split")
    imp.add_argument("--split", type=float, nargs=3, default=(0.6, 0.15, 0.25), metavar=("TRAIN", "VAL", "TEST"))
    imp.add_argument("--seed", type=int, default=0)
    imp.set_defaults(run=_cmd_import)

    train = sub.add_parser("train", help="train and register a model by the FL-CNN recipe")
    train.add_argument("--task", choices=sorted(TASKS), default="tumor")
    train.add_argument("--modality", choices=MODALITIES, default="FL")
    train.add_argument("--architecture", choices=list_architectures(), default="efficientnet_b0")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--image-size", type=int, default=224)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, help="default: the recipe's (1e-4; CELNet 1e-5; CompSegNet none)")
    train.add_argument("--dropout", type=float, help="dropout before the classifier (the builder's drop_rate)")
    train.add_argument(
        "--model-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the architecture's builder (repeatable): "
        + "; ".join(f"{a}: {', '.join(model_options(a)) or '-'}" for a in list_architectures()),
    )
    train.add_argument(
        "--policy",
        choices=[p for p in POLICIES if p != "fixed"],
        help="operating threshold rule (default: closest for grade and ki67, sens90 otherwise, as in seed 003)",
    )
    train.add_argument("--name", help="registry name (default: modality-task-architecture-timestamp)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--pretrained-file", help="a local ImageNet checkpoint to start from (nothing is downloaded)")
    train.add_argument(
        "--data", help="a localisation set (python -m core synth): train from its image-level labels instead"
    )
    train.add_argument(
        "--mosaics",
        help="RCM mosaics with masks in train/, val/ (and test/) (python -m core synth rcm): a patch classifier "
        "(task aspecific) from patches labelled by their centre pixel; --image-size is the patch side",
    )
    train.add_argument("--patches", type=int, default=200, help="patches drawn per mosaic (--mosaics)")
    train.add_argument(
        "--context",
        type=int,
        default=0,
        metavar="PX",
        help="--mosaics: train on each window with PX px of mosaic around it, pooling the window's own feature cells "
        "(a multiple of the trunk's stride, e.g. 32 for EfficientNet-B2), so the features hold with the whole trunk "
        "shared over a mosaic (python -m core mosaic, fast mode); 0 (default): the windows alone",
    )
    train.add_argument(
        "--padded-fraction",
        type=float,
        default=0.0,
        metavar="P",
        help="with --context: the probability that a training window is seen alone, zero-padded at its border as on "
        "the Diagnose page, instead of with its context (0 to 1; default 0)",
    )
    train.add_argument("--recipe", choices=sorted(RECIPES), help="default: the architecture's paper's recipe")
    train.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="augmentation: additive Gaussian noise, each patch's SD drawn uniformly in [0, SIGMA] grey levels of "
        "the [0, 1] intensity scale (seed 002's 'noise'; default 0: off)",
    )
    train.add_argument(
        "--blur",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="augmentation: Gaussian blur, each patch's SD drawn uniformly in [0, SIGMA] px (seed 002's "
        "'blurring'; default 0: off)",
    )
    train.set_defaults(run=_cmd_train)

    models = sub.add_parser("models", help="list the registered models")
    models.add_argument("--task", choices=sorted(TASKS))
    models.add_argument("--modality", choices=MODALITIES)
    models.add_argument("--json", action="store_true", help="a JSON list of objects")
    models.set_defaults(run=_cmd_models)

    predict = sub.add_parser("predict", help="diagnose image files; write JSON, heatmap .npy and PNGs per file")
    predict.add_argument("files", nargs="+", metavar="FILE")
    predict.add_argument("--model", help="registered name or id (may be omitted when one model fits --task)")
    predict.add_argument("--task", choices=sorted(TASKS), default="tumor")
    predict.add_argument(
        "--heatmap",
        default="gradcam",
        choices=[*list_methods(), "none"],
        help="heatmap method (see `python -m core heatmaps`); guided-gradcam also writes the five FL-CNN views",
    )
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(run=_cmd_predict)

    mosaic = sub.add_parser("mosaic", help="stitch a patch classifier's heatmap over a whole mosaic (seed 002)")
    mosaic.add_argument("file", metavar="FILE")
    mosaic.add_argument("--model", help="registered name or id (default: the one aspecific patch classifier)")
    mosaic.add_argument("--step", type=int, default=50, help="window step in px (paper: 25, 50 or 100)")
    mosaic.add_argument("--sigma", type=float, default=5.0, help="Gaussian concentration (window/sigma px); 0 = none")
    mosaic.add_argument("--mode", choices=MODES, default="fast", help="fast (shared trunk) or the exact references")
    mosaic.add_argument("--heatmap", default="cam", help="cam or gradcam (fast); any method with --mode exact")
    mosaic.add_argument("--batch-size", type=int, default=32, help="windows per forward pass in exact mode")
    mosaic.add_argument("--float16", action="store_true", help="write the full-resolution map as float16")
    mosaic.add_argument("--out", required=True, help="output folder")
    mosaic.add_argument("--device", default="auto")
    mosaic.set_defaults(run=_cmd_mosaic)

    clip = sub.add_parser(
        "clip",
        help="triage a CLE clip (multi-page TIFF, MP4/AVI/MOV, zip or folder of frames): frames.csv + top frames",
    )
    clip.add_argument("file", metavar="FILE")
    clip.add_argument("--model", help="registered name or id (may be omitted when one diagnostic-frame model exists)")
    clip.add_argument(
        "--heatmap",
        default="default",
        choices=["default", *list_methods(), "none"],
        help="top frames' heatmap; default: the model's own map (MLCAM-LICI, CompSegNet, CeLNet: CELM), else Grad-CAM",
    )
    clip.add_argument("--top", type=int, default=5, help="the K most diagnostic frames (half a second apart) (5)")
    clip.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (8)")
    clip.add_argument("--out", required=True, help="output folder: frames.csv, clip.json, top frames and heatmaps")
    clip.add_argument("--device", default="auto")
    clip.set_defaults(run=_cmd_clip)

    heatmaps = sub.add_parser("heatmaps", help="list the registered heatmap methods")
    heatmaps.set_defaults(run=_cmd_heatmaps)

    users = sub.add_parser(
        "users",
        help="list, add and manage accounts",
        description="list | add --username U --password P [--role R] [--display-name N] | deactivate U | "
        "activate U | role U --role R | reset U [--password P] | unlock U",
    )
    users.add_argument("action", choices=["list", "add", "deactivate", "activate", "role", "reset", "unlock"])
    users.add_argument("target", nargs="?", metavar="USERNAME", help="the account to change")
    users.add_argument("--username", help="the new account's username (add)")
    users.add_argument("--password", help="add: the password; reset: a temporary one instead of a random one")
    users.add_argument("--role", choices=ROLES, help="add (default reader), role")
    users.add_argument("--display-name")
    users.set_defaults(run=_cmd_users)

    study = sub.add_parser("studies", help="list reader studies, export their reads or drawn masks, import reads")
    study.add_argument("action", choices=["list", "export", "import", "export-masks"])
    study.add_argument("study", nargs="?", type=int, help="study id (export, import, export-masks)")
    study.add_argument("--out", help="export: the reads CSV to write (long format); export-masks: the folder")
    study.add_argument("--layer", help="export-masks: the layer (default: the study's first)")
    study.add_argument("--coco", help="export-masks: also write every arm's and layer's drawings as COCO RLE JSON")
    study.add_argument("--history", action="store_true", help="export every version of corrected answers")
    study.add_argument("--cases", help="export: also write the cases with their truth to this CSV")
    study.add_argument(
        "--predictions", help="export: also write one arm's model scores (case_id, truth, score) for analyze"
    )
    study.add_argument(
        "--arm", help="export --predictions: the arm (needed when the study has several); export-masks: default first"
    )
    study.add_argument("--model", help="export --predictions: the model, name or id (default: the arm's newest)")
    study.add_argument("--file", help="import: the reads CSV to read")
    study.add_argument("--create-readers", action="store_true", help="import: add unknown readers as inactive")
    study.add_argument(
        "--as-active-readers",
        action="store_true",
        help="import: allow reads under existing active reader accounts (audited with the readers and cases)",
    )
    study.set_defaults(run=_cmd_studies)

    analyze = sub.add_parser("analyze", help="CNN vs readers with CIs and paired tests, or MRMC, from CSV files")
    analyze.add_argument("--predictions", help="P.csv: case_id, truth (0/1), score in [0, 1]")
    analyze.add_argument("--reads", help="R.csv: case_id, reader_id, label (0/1) [, rating, rating_scale, score, arm]")
    analyze.add_argument("--arm", help="analyse only this arm's reads (its model's scores are --predictions)")
    analyze.add_argument(
        "--rating-scale",
        choices=sorted(RATING_SCALES),
        help="the scale of R.csv's rating when it has no score or rating_scale column (default: ratings as given)",
    )
    analyze.add_argument("--ratings", help="MRMC ratings: reader, modality, case, truth, rating")
    analyze.add_argument("--mrmc", action="store_true", help="Obuchowski-Rockette MRMC analysis of --ratings")
    analyze.add_argument("--cov", choices=("jackknife", "delong", "unbiased"), default="jackknife")
    choice = analyze.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, help="the model's operating threshold (default 0.5)")
    choice.add_argument(
        "--policy", choices=[p for p in POLICIES if p != "fixed"], help="choose the threshold on these cases"
    )
    analyze.add_argument("--bootstrap", type=int, default=1000, help="case resamples for the CIs")
    analyze.add_argument("--permutations", type=int, default=10000, help="for the paired permutation tests")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--out", required=True, help="report.json")
    analyze.set_defaults(run=_cmd_analyze)

    audit = sub.add_parser("audit", help="verify the hash chains of the audit log and the reads (tamper evidence)")
    audit.add_argument("action", choices=["verify"])
    audit.add_argument(
        "--head", action="append", default=[], metavar="HASH", help="a head printed earlier, which must still be there"
    )
    audit.set_defaults(run=_cmd_audit)

    localize = sub.add_parser(
        "evaluate-localization", help="score heatmaps against expert masks (pixel AUC, Dice, mean IU, 75 %% rule)"
    )
    localize.add_argument("--maps", required=True, help="folder of maps: .npy in [0, 1] or 8-bit .png (/255)")
    localize.add_argument("--masks", required=True, help="mask PNGs: 0 negative, 255 positive, other values unlabeled")
    localize.add_argument("--threshold", type=float, default=0.5, help="for mean IU and the 75 %% region rule")
    localize.add_argument("--bootstrap", type=int, default=1000, help="image resamples for the pixel-AUC CI")
    localize.add_argument("--seed", type=int, default=0)
    localize.add_argument("--out", required=True, help="report.json")
    localize.set_defaults(run=_cmd_evaluate_localization)

    add_agreement_parser(sub)
    add_compare_models_parser(sub)

    synth = sub.add_parser(
        "synth", help="write synthetic data with masks: a CLE or spectral localisation set, or RCM mosaics"
    )
    synth.add_argument("kind", choices=sorted([*KINDS, "rcm"]))
    synth.add_argument("--out", required=True, help="the folder to create")
    synth.add_argument(
        "--counts", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="default 400 100 200 (rcm: 6 1 2)"
    )
    synth.add_argument("--size", type=int, help="image side in px (default 128; rcm mosaics: 512)")
    synth.add_argument("--channels", type=int, default=128, help="spectral channels (spectral sets)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(run=_cmd_synth)

    study = sub.add_parser(
        "localization-study", help="a seed paper's localisation table: seed model, ablations, baseline, stored"
    )
    study.add_argument("study", choices=sorted(study_titles()))
    study.add_argument("--data", help="reuse (or create) the set in this folder")
    study.add_argument(
        "--counts", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="images (rcm: mosaics) per split"
    )
    study.add_argument("--size", type=int, help="image (rcm: mosaic) side in px")
    study.add_argument(
        "--window", type=int, help="rcm, rcm-grid: patch and sliding-window side in px (default 128; rcm-grid 64)"
    )
    study.add_argument(
        "--patches", type=int, help="rcm, rcm-grid: training (and patch-accuracy) patches per mosaic (default 400; 300)"
    )
    study.add_argument(
        "--scorecam-step", type=int, help="rcm: step in px of the Score-CAM rows and their CAM twin (default: window)"
    )
    study.add_argument("--channels", type=int, help="spectral channels")
    study.add_argument("--epochs", type=int, help="override every model's epochs")
    study.add_argument(
        "--models", nargs="+", metavar="KEY", help="train only these of the study's models (and its main one)"
    )
    study.add_argument(
        "--set",
        action="append",
        metavar="MODEL.FIELD=VALUE",
        help="one model's recipe (repeatable): lr, epochs, batch_size, augment, recipe, weight_decay, noise (SD, "
        "[0, 1] grey levels), blur (SD, px) or a builder option such as drop_rate, e.g. --set main.lr=0.05 --set "
        "baseline.weight_decay=5e-4 --set main.noise=0.05",
    )
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--bootstrap", type=int, default=500, help="image resamples for the pixel-AUC CIs")
    study.add_argument("--out", help="also write the report as JSON")
    study.set_defaults(run=_cmd_localization_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command != "jobs":
        _parser().parse_args(argv)  # argparse's own "unrecognized arguments" message and exit status
    args.rest = rest
    try:
        return args.run(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
