"""The trainer's old module names: each still imports (and runs with ``python -m``) as its new module.

The docs, the model cards and the training configs record commands such as
``python -m trainer.seg_recalibrate``; those stay the documented commands. The mechanism is
:mod:`sci_node.moved`'s (an alias is the same module object, no stub file at the old path).
"""
from __future__ import annotations

#: old module name -> new module name
MOVED: dict[str, str] = {
    "trainer.classifiers": "trainer.classify.train",
    "trainer.cls_arch": "trainer.studies.cls_arch",
    "trainer.cls_data": "trainer.classify.data",
    "trainer.cls_ensemble": "trainer.classify.ensemble",
    "trainer.cls_metrics": "trainer.classify.metrics",
    "trainer.cls_nonspine": "trainer.classify.nonspine",
    "trainer.cls_report": "trainer.studies.cls_report",
    "trainer.cls_scenes": "trainer.classify.scenes",
    "trainer.cls_score": "trainer.studies.cls_score",
    "trainer.cls_synth": "trainer.classify.synth",
    "trainer.data": "trainer.segment.data",
    "trainer.disc_render": "trainer.labels.disc_render",
    "trainer.examples": "trainer.studies.examples",
    "trainer.finetune": "trainer.segment.finetune",
    "trainer.infer_check": "trainer.studies.infer_check",
    "trainer.seg": "trainer.segment.train",
    "trainer.seg3d_probe": "trainer.studies.seg3d_probe",
    "trainer.seg_assemble": "trainer.segment.assemble",
    "trainer.seg_ensemble": "trainer.segment.ensemble",
    "trainer.seg_eval": "trainer.segment.evaluate",
    "trainer.seg_loop": "trainer.segment.loop",
    "trainer.seg_recalibrate": "trainer.segment.recalibrate",
    "trainer.seg_report": "trainer.studies.seg_report",
    "trainer.seg_rescore": "trainer.segment.rescore",
    "trainer.synth": "trainer.segment.synth",
}
