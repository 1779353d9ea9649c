"""HALO's EM-CoT data pipeline: raw trajectories → "thought → foresight → action" training samples.

- Stage A (:mod:`.primitives`): per-arm motion primitives and template sentences from end-effector xyz and
  gripper openness, HALO's thresholds as :class:`PrimitiveConfig`, the state layout as :class:`StateLayout`.
- Stage B (:mod:`.annotators`): the plan and subtask frame ranges from a served VLM (:class:`OpenAIAnnotator`)
  or from gripper events and a template (:class:`RulesAnnotator`), cached on disk (:class:`AnnotationCache`).
- Stage C (:mod:`.samples`): per frame the current subtask, the subgoal frame and HALO's thought text, written
  to the dataset folder as a sidecar (``meta/emcot``) read by :class:`EmcotAnnotations`.

``vla-blocks annotate DATASET --annotator openai|rules`` runs all three (:mod:`.cli`).
"""

from .annotation import AnnotationError, EpisodeAnnotation, ReplyError, SubtaskSpan, match_subtask, validate_spans
from .annotators import (PROMPT_VERSION, AnnotationCache, AnnotationRun, EpisodeInput, OpenAIAnnotator, RulesAnnotator,
                         annotate_episodes, sample_frame_ids)
from .primitives import (ArmSpec, EpisodePrimitives, PrimitiveConfig, PrimitiveSegment, StateLayout,
                         extract_primitives, label_arm, primitive_sentence)
from .samples import (EmcotAnnotations, EmcotFrame, current_subtasks, first_moving_frame, frame_samples,
                      subgoal_frames, write_sidecar)

__all__ = ["AnnotationError", "EpisodeAnnotation", "ReplyError", "SubtaskSpan", "match_subtask", "validate_spans",
           "PROMPT_VERSION", "AnnotationCache", "AnnotationRun", "EpisodeInput", "OpenAIAnnotator", "RulesAnnotator",
           "annotate_episodes", "sample_frame_ids", "ArmSpec", "EpisodePrimitives", "PrimitiveConfig",
           "PrimitiveSegment", "StateLayout", "extract_primitives", "label_arm", "primitive_sentence",
           "EmcotAnnotations", "EmcotFrame", "current_subtasks", "first_moving_frame", "frame_samples",
           "subgoal_frames", "write_sidecar"]
