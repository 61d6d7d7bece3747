"""The training losses of anchor-text matching: contrastive, false-negative suppression (FNS) and
equivariant regularization (ER).

Shapes: B samples, K selected anchors, E expressions per sample, D embedding width.
Similarities are plain dot products (no normalisation, no temperature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """``[..., B, B]`` -> ``[..., B, B-1]`` with the diagonal removed, row by row (a gather, not a
    boolean mask, so no device-to-host sync)."""
    b = x.shape[-1]
    cols = torch.arange(b - 1, device=x.device)
    index = cols + (cols[None, :] >= torch.arange(b, device=x.device)[:, None])  # skip column i in row i
    return x.gather(-1, index.expand(*x.shape[:-2], b, b - 1))


def contrastive_loss(sim_best: torch.Tensor, sim_second: torch.Tensor,
                     same_image: torch.Tensor | None = None) -> torch.Tensor:
    """Anchor-text contrast with negative-anchor augmentation.

    Row i of the logits: the best anchor of every image for text i, then the
    second-best anchor of every *other* image; the target is image i.
    ``sim_*`` are ``[E, B_text, B_image]``; returns ``[E]``. ``same_image`` ``[B,B]``: sample pairs
    that share an image, whose negatives are dropped (another entry of one's own image holds the
    positive's anchors).
    """
    e, b, _ = sim_best.shape
    if same_image is not None:
        other_entry = same_image & ~torch.eye(b, dtype=torch.bool, device=same_image.device)
        sim_best = sim_best.masked_fill(other_entry, float("-inf"))
        sim_second = sim_second.masked_fill(other_entry, float("-inf"))
    logits = torch.cat([sim_best, _off_diagonal(sim_second)], dim=-1)  # [E, B, 2B-1]
    target = torch.arange(b, device=logits.device).repeat(e)
    return F.cross_entropy(logits.flatten(0, 1), target, reduction="none").view(e, b).mean(-1)


def false_negative_suppression(best_anchor: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cross-modal similarities pulled towards intra-modal ones, a soft target that tolerates
    other samples describing the same kind of object.

    best_anchor ``[E,B,D]`` (each text's best anchor in its own image), text ``[E,B,D]``; returns ``[E]``.
    """
    intra = (best_anchor @ best_anchor.transpose(1, 2) + text @ text.transpose(1, 2)) / 2
    cross = best_anchor @ text.transpose(1, 2)
    return (intra.softmax(-1) - cross.softmax(-1)).abs().mean(dim=(1, 2))


def equivariant_regularization(sim_best: torch.Tensor, same_image: torch.Tensor | None = None) -> torch.Tensor:
    """Swapping two samples should change their match scores symmetrically.

    With P the row softmax of ``sim_best`` ``[E,B,B]`` (text i over images j), over
    ordered pairs i != j: |(P_ii - P_ij) - (P_jj - P_ji)| and |(P_ii - P_ji) - (P_jj - P_ij)|,
    each averaged; returns ``[E]``. With ``same_image`` ``[B,B]``, pairs of one image are neither
    in the softmax nor among the pairs (they are not two images to swap).
    """
    if same_image is not None:
        b = sim_best.shape[-1]
        sim_best = sim_best.masked_fill(same_image & ~torch.eye(b, dtype=torch.bool, device=sim_best.device),
                                        float("-inf"))
    p = sim_best.softmax(-1)
    diag = p.diagonal(dim1=1, dim2=2)  # [E, B]
    p_ii, p_jj = diag[:, :, None], diag[:, None, :]
    p_ij, p_ji = p, p.transpose(1, 2)
    d1 = _off_diagonal((p_ii - p_ij) - (p_jj - p_ji)).abs()
    d2 = _off_diagonal((p_ii - p_ji) - (p_jj - p_ij)).abs()
    if same_image is None:
        return d1.mean(dim=(1, 2)) + d2.mean(dim=(1, 2))
    pairs = _off_diagonal(~same_image).to(d1.dtype)  # [B, B-1]
    count = pairs.sum().clamp(min=1)
    return ((d1 * pairs).sum(dim=(1, 2)) + (d2 * pairs).sum(dim=(1, 2))) / count


def referent_contrast(own_sim: torch.Tensor, same_image: torch.Tensor) -> torch.Tensor:
    """Expressions of different referents of one image should pick different anchors.

    ``own_sim`` ``[E,B,K]``: each text against its own image's K anchors; ``same_image`` ``[B,B]``,
    whose off-diagonal pairs are two referents of one image (an entry is one referent). For each such
    pair whose best anchors coincide, the probability that both pick that anchor, ``p_i(a) p_j(a)``
    (softmax over K): its gradient pushes the less confident of the two harder, towards its next
    anchor. Pairs that already pick different anchors cost nothing. Averaged over the pairs of one
    image; returns ``[E]`` (0 without such pairs).
    """
    b = own_sim.shape[1]
    p = own_sim.softmax(-1)  # [E, B, K]
    best = p.argmax(-1)  # [E, B]
    p_best = p.gather(-1, best[..., None])[..., 0]  # [E, B]: p_i(a_i)
    p_j_at_i = p.gather(-1, best[:, None, :].expand(-1, b, -1))  # [E, B_j, B_i]: p_j(a_i)
    pairs = torch.triu(same_image, diagonal=1)  # each unordered pair once
    collide = (best[:, :, None] == best[:, None, :]) & pairs  # [E, B_i, B_j]
    joint = p_best[:, :, None] * p_j_at_i.transpose(1, 2)  # [E, B_i, B_j]: p_i(a_i) p_j(a_i)
    return (joint * collide).sum(dim=(1, 2)) / pairs.sum().clamp(min=1)


def own_image(anchors: torch.Tensor) -> torch.Tensor:
    """``[B,K,D]`` as given, or from anchors conditioned per text ``[B_text,B_image,K,D]`` each image
    as its own expression sees it."""
    if anchors.dim() == 3:
        return anchors
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    return anchors[rows, rows]


def coreferent_agreement(own_sim: torch.Tensor) -> torch.Tensor:
    """The expressions of one sample name one referent: each is pulled towards the anchor they
    choose together, the best sum of their log-probabilities (the vote test.py's pseudo-label
    export takes). ``own_sim`` ``[E,B,K]``: each text against its own image's K anchors; returns
    ``[E]``, the cross-entropy of each expression's distribution over K with the voted anchor."""
    log_p = own_sim.log_softmax(-1)  # [E, B, K]
    voted = log_p.detach().sum(0).argmax(-1)  # [B]
    return -log_p.gather(-1, voted[None, :, None].expand(log_p.shape[0], -1, 1))[..., 0].mean(-1)


def rec_loss(anchors: torch.Tensor, texts: torch.Tensor, fns_weight: float = 0.1,
             er_weight: float = 0.1, image_ids: torch.Tensor | None = None,
             referent_weight: float = 0.0, agreement_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """anchors ``[B,K,D]`` (or ``[B_text,B_image,K,D]``, conditioned per text), texts ``[B,E,D]`` ->
    ``{'loss', 'ce'[, 'fns'][, 'er'][, 'referent'][, 'agreement']}``, each the mean over the E
    expressions; ``loss = ce + fns_weight * fns + er_weight * er + referent_weight * referent +
    agreement_weight * agreement`` (:func:`coreferent_agreement`). Terms of weight 0 are skipped. ``image_ids`` ``[B]`` (GROUP_BY_IMAGE): samples of one image are not each other's
    negatives, and the referent contrast (:func:`referent_contrast`) compares them."""
    texts = texts.transpose(0, 1)  # [E, B, D]
    if anchors.dim() == 4:  # [B_text, B_image, K, D]: image j's anchors as text i sees them
        sim = torch.einsum("eid,ijkd->eijk", texts, anchors)
        anchors = own_image(anchors)
    else:
        sim = torch.einsum("eid,jkd->eijk", texts, anchors)  # [E, B_text, B_image, K]
    same_image = None if image_ids is None else image_ids[:, None] == image_ids[None, :]  # [B, B]
    top2 = sim.topk(2, dim=-1).values
    sim_best, sim_second = top2[..., 0], top2[..., 1]
    ce = contrastive_loss(sim_best, sim_second, same_image)
    loss = ce
    parts = {"ce": ce.mean()}
    own = sim.diagonal(dim1=1, dim2=2)  # [E, K, B]: text i against anchors of image i
    if fns_weight:
        best_k = own.argmax(dim=1)  # [E, B]
        best_anchor = anchors[torch.arange(anchors.shape[0], device=anchors.device), best_k]  # [E,B,D]
        fns = false_negative_suppression(best_anchor, texts)
        loss = loss + fns_weight * fns
        parts["fns"] = fns.mean()
    if er_weight:
        er = equivariant_regularization(sim_best, same_image)
        loss = loss + er_weight * er
        parts["er"] = er.mean()
    if referent_weight:
        if same_image is None:
            raise ValueError("the referent contrast needs image_ids (GROUP_BY_IMAGE)")
        referent = referent_contrast(own.transpose(1, 2), same_image)
        loss = loss + referent_weight * referent
        parts["referent"] = referent.mean()
    if agreement_weight:
        agreement = coreferent_agreement(own.transpose(1, 2))
        loss = loss + agreement_weight * agreement
        parts["agreement"] = agreement.mean()
    return {"loss": loss.mean(), **parts}
