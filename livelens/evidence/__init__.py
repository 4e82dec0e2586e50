"""Evidence for model decisions: Grad-CAM, weak boxes, the small-target second pass, evidence-keeping crops."""

from livelens.evidence.crop import EvidenceCrop
from livelens.evidence.gradcam import box_iou, boxes_from_heatmap, grad_cam
from livelens.evidence.second_pass import expand_box, merge_passes, second_pass

__all__ = ["EvidenceCrop", "box_iou", "boxes_from_heatmap", "expand_box", "grad_cam", "merge_passes", "second_pass"]
