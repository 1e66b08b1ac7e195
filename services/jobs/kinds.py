"""The kinds of long work a job can be: what each checks before it is queued, and what it runs.

A kind's ``check`` runs at submission, in the submitting process: it turns the raw parameters (a form, the CLI)
into complete, JSON-able ones or raises ``ValueError`` with a message that says what to change, so a bad request
never becomes a queued job. ``run`` runs on a worker with a :class:`~services.jobs.runner.JobContext` and returns
what the job produced (also recorded product by product through ``context.claim``).

Kinds: ``train`` (every architecture and recipe ``python -m core train`` offers; from the cohort, a localisation
set, or RCM mosaics), ``import`` (a cohort folder or zip with ``manifest.csv``), ``localization-study``,
``mosaic`` (a whole-mosaic stitched heatmap), ``scorecam`` (Score-CAM on a large image), ``clip`` (a CLE clip's
triage), ``study-ai`` (an aided arm's AI output), ``compare-models`` (two models of one task on the same specimens:
seed 003's Table 2 / Fig. 4) and ``demo`` (the demo workspace, part by part).
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from core.settings import workspace_dir
from services.jobs.runner import JobContext

__all__ = ["KINDS", "Kind", "check_params"]


@dataclass(frozen=True)
class Kind:
    name: str
    label: str  # for people: "Train a model"
    check: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]  # -> (title, complete params)
    run: Callable[[JobContext, dict[str, Any]], dict[str, Any]]
    network: bool = True  # runs a network: asks for a GPU where the cluster has one
    cpus: int = 1


def _int(params: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{key} must be between {low} and {high}, not {number}")
    return number


def _model(name_or_id: Any, *, modality: str | None = None, task: str | None = None) -> Any:
    from db import repo
    from db.session import read_scope

    with read_scope() as session:
        model = repo.find_model(session, str(name_or_id)) if name_or_id not in (None, "") else None
    if model is None:
        raise ValueError(f"no registered model {name_or_id!r}; see the Models page or `python -m core models`")
    if modality and model.modality != modality:
        raise ValueError(f"model {model.name} is a {model.modality} model, not {modality}")
    if task and model.task != task:
        raise ValueError(f"model {model.name} is a {model.task} model, not {task}")
    return model


def _workspace_file(relative: Any, what: str) -> Path:
    """A file inside the workspace, named by its workspace-relative path (a job never reads outside it)."""
    text = str(relative or "")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{what} must be a path inside the workspace, not {text!r}")
    full = workspace_dir() / path
    if not full.is_file():
        raise ValueError(f"{what} {text!r} is not in the workspace (upload it again)")
    return full


# --- train -------------------------------------------------------------------------------------------------------


def _check_train(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from core.models import check_model_options
    from core.models import list_models as architectures
    from core.stats.thresholds import POLICIES
    from core.train import RECIPES, TASKS, TrainConfig
    from db.models import MODALITIES
    from services.training import check_model_name, default_name

    allowed = {f.name for f in fields(TrainConfig)}
    unknown = set(params) - allowed - {"name", "data", "mosaics", "patches"}
    if unknown:
        raise ValueError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
    config = TrainConfig(**{k: v for k, v in params.items() if k in allowed})
    if config.architecture not in architectures():
        raise ValueError(f"unknown architecture {config.architecture!r}; choose one of {', '.join(architectures())}")
    options = config.model_kwargs if config.model_kwargs is not None else {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError("model options must be a JSON object of option names and values")
    config = replace(config, model_kwargs=check_model_options(config.architecture, options))
    if config.weight_decay is not None:
        decay = config.weight_decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay < 1.0:
            raise ValueError(f"weight decay must be a number in [0, 1), not {decay!r}")
    for key, high in (("noise", 1.0), ("blur", 64.0)):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < high:
            raise ValueError(f"{key} must be a number in [0, {high:g}), not {value!r}")
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose one of {', '.join(sorted(TASKS))}")
    if config.modality not in MODALITIES:
        raise ValueError(f"unknown modality {config.modality!r}; choose one of {', '.join(MODALITIES)}")
    if config.recipe is not None and config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; choose one of {', '.join(sorted(RECIPES))}")
    if config.threshold_policy is not None and (
        config.threshold_policy not in POLICIES or config.threshold_policy == "fixed"
    ):
        raise ValueError(f"unknown threshold policy {config.threshold_policy!r}")
    for key, low, high in (("epochs", 1, 1000), ("image_size", 16, 1024), ("batch_size", 1, 1024)):
        _int(params, key, getattr(config, key), low, high)
    if not 0 < float(config.lr) < 1:
        raise ValueError(f"learning rate must be between 0 and 1, not {config.lr}")
    if params.get("data") and params.get("mosaics"):
        raise ValueError("give a localisation set or RCM mosaics, not both")
    if params.get("mosaics"):
        config = replace(config, task="aspecific", modality="RCM")
    for key in ("data", "mosaics", "pretrained_file"):
        if params.get(key) and not Path(str(params[key])).exists():
            raise ValueError(f"{key} {params[key]!r} does not exist on the server")
    name = str(params.get("name") or default_name(config))
    check_model_name(name)
    complete = {**config.to_dict(), "name": name}
    for key in ("data", "mosaics"):
        if params.get(key):
            complete[key] = str(params[key])
    if params.get("mosaics"):
        complete["patches"] = _int(params, "patches", 200, 1, 100_000)
    source = " from RCM mosaics" if params.get("mosaics") else " from a localisation set" if params.get("data") else ""
    title = f"Train {name} ({config.architecture}, {config.modality} {config.task}, {config.epochs} epochs{source})"
    return title, complete


def _train_config(params: dict[str, Any], device: str) -> Any:
    from core.train import TrainConfig

    allowed = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in params.items() if k in allowed})
    return replace(config, device=device if config.device == "auto" else config.device)


def _run_train(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    config = _train_config(params, context.device)
    name = params["name"]
    if params.get("mosaics"):
        from services.mosaic import read_mosaic_folder, train_patch_classifier

        info, _ = train_patch_classifier(
            config,
            read_mosaic_folder(params["mosaics"]),
            name=name,
            patches_per_mosaic=int(params.get("patches") or 200),
            seed=config.seed,
            progress=context.training(),
            log=context.log,
        )
    elif params.get("data"):
        from core.data.localization_set import read_set
        from services.localization import train_on_set

        info = train_on_set(config, read_set(params["data"]), name=name, progress=context.training(), log=context.log)
    else:
        from services.training import train_and_register

        info = train_and_register(config, name=name, progress=context.training(), log=context.log)
    return {"model": info.name, "model_id": info.id}


# --- import ------------------------------------------------------------------------------------------------------


def _check_import(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    complete: dict[str, Any] = {"seed": _int(params, "seed", 0, 0, 2**31 - 1)}
    split = params.get("split") or (0.6, 0.15, 0.25)
    try:
        split = [float(x) for x in split]
    except (TypeError, ValueError):
        raise ValueError("split must be three fractions (train, val, test)") from None
    if len(split) != 3 or any(x < 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError("split must be three non-negative fractions (train, val, test) that add up to 1")
    complete["split"] = split
    if params.get("zip"):
        archive = _workspace_file(params["zip"], "the cohort zip")
        if not zipfile.is_zipfile(archive):
            raise ValueError("the uploaded file is not a zip archive; zip the cohort folder with its manifest.csv")
        with zipfile.ZipFile(archive) as bundle:
            names = bundle.namelist()
            _check_zip_sizes(bundle, workspace_dir())
        if not any(PurePosixPath(n).name == "manifest.csv" for n in names):
            raise ValueError("the zip has no manifest.csv; put the manifest at the top of the cohort folder")
        complete["zip"] = str(params["zip"])
        complete["name"] = str(params.get("name") or PurePosixPath(params["zip"]).name)[:120]
        return f"Import cohort {complete['name']}", complete
    folder = Path(str(params.get("folder") or ""))
    if not str(params.get("folder") or "") or not folder.is_dir():
        raise ValueError(f"{str(params.get('folder') or '')!r} is not a folder on the server")
    if not (folder / "manifest.csv").is_file():
        raise ValueError(f"{folder} has no manifest.csv")
    complete["folder"] = str(folder.resolve())
    return f"Import cohort from {folder.name}", complete


_MAX_RATIO = 200  # images compress a little; a member that inflates more than this is a zip bomb


def _check_zip_sizes(bundle: zipfile.ZipFile, target: Path) -> None:
    """Refuse a zip that would fill the disk or inflates like a bomb, before anything is extracted."""
    members = bundle.infolist()
    total = sum(m.file_size for m in members)
    free = shutil.disk_usage(target if target.exists() else workspace_dir()).free
    if total > free - 1_000_000_000:
        raise ValueError(
            f"the zip unpacks to {total / 1e9:.1f} GB but the workspace disk has {free / 1e9:.1f} GB free; "
            "import from a folder on the server instead"
        )
    for member in members:
        if member.file_size > 10_000_000 and member.file_size > _MAX_RATIO * max(member.compress_size, 1):
            raise ValueError(f"{member.filename!r} inflates {member.file_size // max(member.compress_size, 1)}-fold")


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing members that would land outside ``target`` (zip slip), links and bombs."""
    with zipfile.ZipFile(archive) as bundle:
        _check_zip_sizes(bundle, target)
        for member in bundle.infolist():
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"the zip holds an unsafe path {member.filename!r}; nothing was imported")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"the zip holds a link {member.filename!r}; nothing was imported")
        bundle.extractall(target)


def _run_import(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.importer import import_manifest

    target = None
    if params.get("zip"):
        target = workspace_dir() / "imports" / f"job-{context.id}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        context.log(f"unpacking {params['name']}")
        _safe_extract(workspace_dir() / params["zip"], target)
        manifests = sorted(target.rglob("manifest.csv"), key=lambda p: len(p.parts))
        manifest = manifests[0]
    else:
        manifest = Path(params["folder"]) / "manifest.csv"
    context.log(f"importing {manifest.parent.name}/manifest.csv")
    report = import_manifest(
        manifest, fractions=tuple(params["split"]), seed=int(params["seed"]), progress=context.span(0.0, 1.0)
    )
    for error in report.errors:
        context.log(f"skipped {error}")
    clips = f" (frames of {report.clips} clips)" if report.clips else ""
    context.log(f"imported {report.specimens} specimens, {report.images} images{clips}")
    if report.images == 0:
        raise ValueError("no image was imported; " + (report.errors[0] if report.errors else "the manifest is empty"))
    return {
        "specimens": report.specimens,
        "images": report.images,
        "imported_clips": report.clips,
        "skipped": len(report.errors),
    }


# --- localisation studies ----------------------------------------------------------------------------------------


def _check_localization(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from services.localization import MOSAIC_STUDIES, check_overrides, study_titles

    titles = study_titles()
    study = str(params.get("study") or "")
    if study not in titles:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(sorted(titles))}")
    complete: dict[str, Any] = {
        "study": study,
        "seed": _int(params, "seed", 0, 0, 2**31 - 1),
        "bootstrap": _int(params, "bootstrap", 500, 0, 100_000),
        "epochs": _int(params, "epochs", None, 1, 1000),
        "size": _int(params, "size", None, 16, 8192),
    }
    counts = params.get("counts")
    if counts:
        if len(counts) != 3:
            raise ValueError("counts must be three numbers: train, val, test")
        complete["counts"] = [_int({"n": c}, "n", None, 1, 100_000) for c in counts]
    if study in MOSAIC_STUDIES:
        complete["window"] = _int(params, "window", None, 16, 1024)
        complete["patches"] = _int(params, "patches", None, 1, 100_000)
    overrides = params.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError('overrides must map a model of the study to its fields, e.g. {"main": {"lr": 0.05}}')
    if overrides:
        complete["overrides"] = check_overrides(study, overrides)
    return f"Localisation study: {titles[study]}", complete


def _run_localization(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.localization import MOSAIC_STUDIES, run_mosaic_study, run_study

    common = {
        "counts": tuple(params["counts"]) if params.get("counts") else None,
        "size": params.get("size"),
        "epochs": params.get("epochs"),
        "seed": params["seed"],
        "bootstrap": params["bootstrap"],
        "overrides": params.get("overrides"),
        "log": context.log,
        "progress": context.training(),
    }
    if params["study"] in MOSAIC_STUDIES:
        report = run_mosaic_study(params["study"], window=params.get("window"), patches=params.get("patches"), **common)
    else:
        report = run_study(params["study"], **common)
    return {"evaluation_id": report["evaluation_id"], "model": report["models"]["main"]}


# --- mosaics and Score-CAM ---------------------------------------------------------------------------------------


def _check_mosaic(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from core.heatmaps.mosaic import MODES

    model = _model(params.get("model"))
    _workspace_file(params.get("file"), "the mosaic")
    mode = str(params.get("mode") or "fast")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    sigma = params.get("sigma", 5.0)
    complete = {
        "model": model.name,
        "file": str(params["file"]),
        "name": str(params.get("name") or PurePosixPath(str(params["file"])).name)[:255],
        "step": _int(params, "step", 50, 1, 4096),
        "sigma": None if sigma in (None, 0, 0.0) else float(sigma),
        "mode": mode,
        "method": str(params.get("method") or "cam"),
    }
    return f"Mosaic heatmap of {complete['name']} with {model.name}", complete


def _run_mosaic(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.mosaic import diagnose_mosaic
    from services.predictions import cached_predictor

    model = _model(params["model"])
    context.log(f"loading {model.name} on {context.device}")
    predictor = cached_predictor(model, context.device)
    outcome = diagnose_mosaic(
        predictor,
        model,
        params["name"],
        workspace_dir() / params["file"],
        user_id=context.submitted_by,
        step=params["step"],
        sigma=params["sigma"],
        mode=params["mode"],
        method=params["method"],
        progress=context.span(0.0, 0.98),
    )
    if outcome.error:
        raise ValueError(outcome.error)
    (workspace_dir() / params["file"]).unlink(missing_ok=True)
    context.log(f"{outcome.windows} windows, highest probability {outcome.probability:.3f}")
    return {"prediction_id": outcome.prediction_id, "upload_id": outcome.upload_id, "probability": outcome.probability}


def _check_scorecam(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    model = _model(params.get("model"))
    _workspace_file(params.get("file"), "the image")
    complete = {
        "model": model.name,
        "file": str(params["file"]),
        "name": str(params.get("name") or PurePosixPath(str(params["file"])).name)[:255],
        "method": str(params.get("method") or "scorecam"),
    }
    return f"{complete['method']} heatmap of {complete['name']} with {model.name}", complete


def _run_scorecam(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.diagnose import cascade_models, diagnose_files
    from services.predictions import cached_predictor

    model = _model(params["model"])
    predictor = cached_predictor(model, context.device)
    # a tumor call goes on to grade and Ki-67 here too (seed 003's cascade, as on the page's direct path)
    followers = cascade_models(model)
    cascade = {task: m and (cached_predictor(m, context.device), m) for task, m in followers.items()} or None
    (outcome,) = diagnose_files(
        predictor,
        model,
        [(params["name"], workspace_dir() / params["file"])],
        user_id=context.submitted_by,
        heatmap=params["method"],
        options={"progress": context.span(0.0, 0.98)} if params["method"] == "scorecam" else None,
        cascade=cascade,
    )
    if outcome.error:
        raise ValueError(outcome.error)
    (workspace_dir() / params["file"]).unlink(missing_ok=True)
    return {
        "prediction_id": outcome.prediction_id,
        "upload_id": outcome.upload_id,
        "probability": outcome.probability,
        "modality": model.modality,
        "cascade": [asdict(call) for call in outcome.cascade],
    }


# --- CLE clips ----------------------------------------------------------------------------------------------------


def _check_clip(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from core.heatmaps import list_methods

    model = _model(params.get("model"), modality="CLE")
    _workspace_file(params.get("file"), "the clip")
    complete = {
        "model": model.name,
        "file": str(params["file"]),
        "name": str(params.get("name") or PurePosixPath(str(params["file"])).name)[:255],
        "top": _int(params, "top", 5, 0, 50),
        "batch_size": _int(params, "batch_size", 8, 1, 256),
    }
    heatmap = params.get("heatmap", "default")
    if heatmap not in (None, "none", "default") and heatmap not in list_methods():
        raise ValueError(f"unknown heatmap {heatmap!r}; choose default, none or one of {', '.join(list_methods())}")
    complete["heatmap"] = None if heatmap in (None, "none") else str(heatmap)
    return f"Triage of clip {complete['name']} with {model.name}", complete


def _run_clip(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.clips import triage_and_store
    from services.predictions import cached_predictor

    model = _model(params["model"])
    context.log(f"loading {model.name} on {context.device}")
    predictor = cached_predictor(model, context.device)
    span = context.span(0.0, 0.95)

    def report(done: int, total: int | None) -> None:
        span(done, total or done + 1, f"{done:,} of {total:,} frames" if total else f"{done:,} frames")

    source = workspace_dir() / params["file"]
    stored = triage_and_store(
        predictor,
        model,
        source,
        name=params["name"],
        user_id=context.submitted_by,
        batch_size=params["batch_size"],
        top_k=params["top"],
        heatmap=params["heatmap"],
        progress=report,
    )
    source.unlink(missing_ok=True)
    triage = stored.triage
    context.log(
        f"{triage.n_frames:,} frames, {triage.n_positive:,} diagnostic at {triage.threshold:.3f}, "
        f"{triage.frames_per_second:.1f} frames/s on {triage.device}"
    )
    return {"triage_id": stored.triage_id, "clip_id": stored.clip_id, "frames": triage.n_frames}


# --- a study's AI output -----------------------------------------------------------------------------------------


def _check_study_ai(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    study = _int(params, "study", None, 1, 2**31 - 1)
    if study is None:
        raise ValueError("give the study id")
    return f"AI output for study {study}", {"study": study}


def _run_study_ai(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.study_ai import prepare_study_ai

    done = prepare_study_ai(params["study"], progress=context.span(0.0, 1.0))
    return {"computed": done}


# --- two models compared (seed 003, Table 2 / Fig. 4) ----------------------------------------------------------

_COMPARE_PARAMS = {"model_a", "model_b", "split", "bootstrap", "permutations", "seed"}
_SPLITS = ("train", "val", "test")


def _check_compare(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from services.model_compare import COMPARABLE_TASKS

    unknown = set(params) - _COMPARE_PARAMS
    if unknown:
        raise ValueError(f"unknown comparison parameter(s): {', '.join(sorted(unknown))}")
    if any(params.get(key) in (None, "") for key in ("model_a", "model_b")):
        raise ValueError("choose two registered models of one task (model_a and model_b)")
    a, b = _model(params["model_a"]), _model(params["model_b"])
    if a.id == b.id:
        raise ValueError(f"choose another model to compare {a.name} with, not {a.name} itself")
    if a.task != b.task:
        raise ValueError(
            f"{a.name} is a {a.task} model and {b.name} a {b.task} model; choose two models of the same task"
        )
    if a.task not in COMPARABLE_TASKS:
        raise ValueError(
            f"{a.task} models learn from pixel labels or a localisation set, not the cohort's specimen labels; "
            f"choose two {', '.join(COMPARABLE_TASKS)} models"
        )
    split = str(params.get("split") or "test")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_SPLITS)}")
    complete = {
        "model_a": a.name,
        "model_b": b.name,
        "split": split,
        "bootstrap": _int(params, "bootstrap", 1000, 100, 20_000),
        "permutations": _int(params, "permutations", 10_000, 100, 100_000),
        "seed": _int(params, "seed", 0, 0, 2**31 - 1),
    }
    return f"Compare {a.name} with {b.name} ({a.task}, {split} split)", complete


def _run_compare(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.model_compare import compare_models, store_comparison

    context.progress(0.0, f"comparing {params['model_a']} with {params['model_b']}")
    report = compare_models(
        params["model_a"],
        params["model_b"],
        split=params["split"],
        resamples=params["bootstrap"],
        permutations=params["permutations"],
        seed=params["seed"],
        progress=context.log,
    )
    evaluation = store_comparison(report)
    context.log(
        f"{report['n_cases']} specimens ({report['n_positive']} positive) compared; stored as evaluation {evaluation}"
    )
    return {"evaluation_id": evaluation}


# --- the demo ----------------------------------------------------------------------------------------------------


def _check_demo(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from services.demo import DEMO_PARTS, DemoConfig

    part = str(params.pop("part", None) or "all")
    if part not in (*DEMO_PARTS, "all"):
        raise ValueError(f"unknown demo part {part!r}; choose one of {', '.join(DEMO_PARTS)}")
    defaults = {f.name: getattr(DemoConfig(), f.name) for f in fields(DemoConfig)}
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown demo setting(s): {', '.join(sorted(unknown))}")
    complete: dict[str, Any] = {"part": part}
    for key, value in params.items():
        default = defaults[key]
        if key == "fl_model_options":  # (name, value) pairs of the FL-CNN's builder, checked below
            if not isinstance(value, list | tuple) or any(
                not isinstance(pair, list | tuple) or len(pair) != 2 or not isinstance(pair[0], str) for pair in value
            ):
                raise ValueError("fl_model_options must be [name, value] pairs, e.g. [['output_stride', 16]]")
            complete[key] = [[name, option] for name, option in value]
        elif key == "fl_augment":
            if not isinstance(value, bool):
                raise ValueError(f"fl_augment must be true or false, not {value!r}")
            complete[key] = value
        elif key == "fl_architecture":
            complete[key] = None if value is None else str(value)
        elif key == "confounders":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 4:
                raise ValueError(f"confounders must be a number from 0 (none) to 4, not {value!r}")
            complete[key] = float(value)
        elif isinstance(default, tuple):
            if not isinstance(value, list | tuple) or len(value) != len(default):
                raise ValueError(f"{key} must be {len(default)} numbers")
            kind = type(default[0])
            if any(not isinstance(v, int | float) or isinstance(v, bool) or v <= 0 for v in value):
                raise ValueError(f"{key} must be positive numbers")
            complete[key] = [kind(v) for v in value]
        elif isinstance(default, str):
            complete[key] = str(value)
        else:
            complete[key] = _int({key: value}, key, None, 0 if key in ("seed", "fl_seed") else 1, 2**31 - 1)
    from core.models import check_model_options, create_model
    from core.models import list_models as architectures

    for key in ("architecture", "fl_architecture"):
        if complete.get(key) is not None and complete[key] not in architectures():
            raise ValueError(f"unknown {key.replace('_', ' ')} {complete[key]!r}")
    if complete.get("fl_model_options"):
        fl = (
            complete.get("fl_architecture", defaults["fl_architecture"])
            or complete.get("architecture")
            or defaults["architecture"]
        )
        options = check_model_options(fl, dict(complete["fl_model_options"]))
        try:  # the builder checks the values (output_stride 8, 16 or 32...): refused now, not after the cohort
            create_model(fl, in_chans=1, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"fl_model_options: {error}") from None
    return f"Demo workspace: {DEMO_PARTS.get(part, 'every part')}", complete


def _run_demo(context: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from services.demo import DemoConfig, build_demo_part

    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k != "part"}
    if "fl_model_options" in settings:
        settings["fl_model_options"] = tuple(tuple(pair) for pair in settings["fl_model_options"])
    span = {"start": 0.0, "end": 1.0, "label": ""}

    def report(start: float, end: float, message: str) -> None:
        span.update(start=start, end=end, label=message.removeprefix("demo: ") + ": ")
        context.progress(start, message)

    def training(p: Any) -> None:
        context.training(span["start"], span["end"], span["label"])(p)

    return build_demo_part(params["part"], DemoConfig(**settings), log=context.log, progress=training, report=report)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("train", "Train a model", _check_train, _run_train, cpus=2),
        Kind("import", "Import a cohort", _check_import, _run_import, network=False),
        Kind("localization-study", "Localisation study", _check_localization, _run_localization, cpus=2),
        Kind("mosaic", "Mosaic heatmap", _check_mosaic, _run_mosaic),
        Kind("scorecam", "Score-CAM heatmap", _check_scorecam, _run_scorecam),
        Kind("clip", "Clip triage", _check_clip, _run_clip),
        Kind("study-ai", "Study AI output", _check_study_ai, _run_study_ai),
        Kind("compare-models", "Compare two models", _check_compare, _run_compare),
        Kind("demo", "Demo workspace", _check_demo, _run_demo, cpus=2),
    )
}


def check_params(kind: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A submission's title and complete parameters, or ``ValueError`` saying what to change."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(params, dict):
        raise ValueError("job parameters must be a JSON object")
    return KINDS[kind].check(dict(params))
