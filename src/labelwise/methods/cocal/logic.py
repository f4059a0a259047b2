"""CoCal's logical-constraint inference (Sec. 2.2.3, "Post-Processing at Inference"; Fig. 3).

A pixel labelled with a part must also carry that part's object. For every part p the
*logical path* p -> o(p), ``o = part_to_object``, has probability

    path(p) = part_prob[p] * object_prob[o(p)],

each pixel takes the best path, and both labels are read off it: ``part = argmax_p path(p)``,
``object = o(part)``. Part and object maps therefore agree by construction (the background
part maps to the background object), and a confident object can overturn the part argmax
(Fig. 3: pixels whose part argmax is snake-head but whose object level is confidently
"reptile" become reptile-head).
"""

from __future__ import annotations

import torch

__all__ = ["consistency", "path_inference"]


def _check_map(part_to_object: torch.Tensor, num_parts: int, num_objects: int, device) -> torch.Tensor:
    p2o = part_to_object.reshape(-1).to(device, torch.long)
    if p2o.shape[0] != num_parts:
        raise ValueError(f"part_to_object has {p2o.shape[0]} entries for {num_parts} parts")
    if p2o.numel() and (int(p2o.min()) < 0 or int(p2o.max()) >= num_objects):
        raise ValueError(f"part_to_object must map every part to an object in [0, {num_objects}), "
                         f"got values in [{int(p2o.min())}, {int(p2o.max())}]")
    return p2o


@torch.no_grad()
def path_inference(part_prob: torch.Tensor, object_prob: torch.Tensor,
                   part_to_object: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best logical path per pixel. See module doc.

    part_prob (B, P, H, W), object_prob (B, O, H, W) (per-pixel probabilities over classes,
    background included), part_to_object (P,) long in [0, O).
    Returns ``(part_label (B, H, W) long, object_label (B, H, W) long, path_prob (B, H, W))``;
    ``path_prob`` is the winning product (fp32). Ties go to the lowest part index.
    """
    if part_prob.dim() != 4 or object_prob.dim() != 4:
        raise ValueError(f"expected (B, P, H, W) and (B, O, H, W), got {tuple(part_prob.shape)} "
                         f"and {tuple(object_prob.shape)}")
    b, p, h, w = part_prob.shape
    if object_prob.shape[0] != b or object_prob.shape[2:] != (h, w):
        raise ValueError(f"part_prob {tuple(part_prob.shape)} and object_prob {tuple(object_prob.shape)} "
                         "differ in batch or spatial size")
    p2o = _check_map(part_to_object, p, object_prob.shape[1], part_prob.device)
    joint = part_prob.float() * object_prob.float().index_select(1, p2o)  # (B, P, H, W): path probabilities
    path_prob, part_label = joint.max(dim=1)
    return part_label, p2o[part_label], path_prob


def consistency(part_label: torch.Tensor, object_label: torch.Tensor, part_to_object: torch.Tensor,
                ignore_index: int = 255) -> float:
    """Fraction of pixels whose object label is the parent of their part label.

    Pixels whose part label is ``ignore_index`` (or outside the map) are not counted; 1.0 when
    no pixel is counted."""
    if part_label.shape != object_label.shape:
        raise ValueError(f"part_label {tuple(part_label.shape)} and object_label {tuple(object_label.shape)} differ")
    p2o = part_to_object.reshape(-1).to(part_label.device, torch.long)
    part = part_label.long()
    counted = (part != ignore_index) & (part >= 0) & (part < p2o.shape[0])
    parent = p2o[torch.where(counted, part, torch.zeros_like(part))]
    n = int(counted.sum())
    if n == 0:
        return 1.0
    return float(((parent == object_label.long()) & counted).sum()) / n
