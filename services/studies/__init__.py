"""Blind reader studies: set-up (PI), the reader protocol (reader), case images, and exchange (export and import).

The rules live here, not in the pages, so every way in (browser, CLI, tests, a tampered session) meets them:

- A reader only reaches studies they are invited to, only the case the server chose for them (the first unanswered
  one in their own stable order), addressed by an opaque token; what they are sent (:class:`ReaderCase`) carries
  no truth, no specimen or patient code, no file name, and AI output only in an aided arm.
- One read per reader, case and arm: the database's unique key on (arm, case, reader, version) settles double
  clicks, resubmitted forms and two tabs; a correction (where the study allows it) is a new version, never an
  overwrite.
- Cases, arms and the rating scale are frozen by the first read; every change, read, export and import is in the
  audit log.
"""

from services.studies.annotations import (
    arm_comparison,
    case_mask_size,
    coco_masks,
    export_masks,
    latest_annotations,
    load_mask,
    masks_zip,
    own_masks,
    record_annotation,
    start_masks,
)
from services.studies.exchange import EXPORT_COLUMNS, ImportReport, export_cases, export_reads, import_reads
from services.studies.experts import (
    OWN_MAP,
    ExpertsReport,
    MapRow,
    expert_map_path,
    expert_map_rows,
    heatmaps_vs_experts,
    prepare_expert_maps,
)
from services.studies.images import CASE_CACHE, VIEW_SIDE, case_png, upcoming_images
from services.studies.protocol import (
    AiShown,
    DrawnRegions,
    ReaderCase,
    ReaderState,
    ReadResult,
    case_for_revision,
    complete_training,
    note_case_shown,
    reader_state,
    record_read,
    revisable_cases,
    training_cases,
)
from services.studies.setup import (
    MAX_COMMENT,
    RATING_RANGES,
    STUDY_TASKS,
    ArmInfo,
    ArmSpec,
    CasePools,
    StudyError,
    StudyInfo,
    case_pools,
    create_study,
    eligible_specimens,
    get_study,
    invite_readers,
    list_studies,
    reader_studies,
    sample_cases,
    set_status,
    study_progress,
    update_study,
)

__all__ = [
    "CASE_CACHE",
    "EXPORT_COLUMNS",
    "MAX_COMMENT",
    "OWN_MAP",
    "RATING_RANGES",
    "STUDY_TASKS",
    "VIEW_SIDE",
    "AiShown",
    "ArmInfo",
    "ArmSpec",
    "CasePools",
    "DrawnRegions",
    "ExpertsReport",
    "ImportReport",
    "MapRow",
    "ReadResult",
    "ReaderCase",
    "ReaderState",
    "StudyError",
    "StudyInfo",
    "arm_comparison",
    "case_for_revision",
    "case_mask_size",
    "case_png",
    "case_pools",
    "coco_masks",
    "complete_training",
    "create_study",
    "eligible_specimens",
    "export_cases",
    "export_masks",
    "export_reads",
    "expert_map_path",
    "expert_map_rows",
    "get_study",
    "heatmaps_vs_experts",
    "import_reads",
    "invite_readers",
    "latest_annotations",
    "list_studies",
    "load_mask",
    "masks_zip",
    "note_case_shown",
    "own_masks",
    "prepare_expert_maps",
    "reader_state",
    "reader_studies",
    "record_annotation",
    "record_read",
    "revisable_cases",
    "sample_cases",
    "set_status",
    "start_masks",
    "study_progress",
    "training_cases",
    "upcoming_images",
    "update_study",
]
