"""Image-text retrieval recall@k in blocks, with memory bounded by the block size.

Names follow CLIP_benchmark (`clip_benchmark/metrics/zeroshot_retrieval.py`), where the word
names what is *retrieved*:

- `image_retrieval_recall@k`: text -> image. For each caption, a hit when its image is among the
  k images that score highest against it.
- `text_retrieval_recall@k`: image -> text. For each image, a hit when ANY of its captions is among
  the k captions that score highest against it (the CLIP papers' recall; CLIP_benchmark computes
  it as "true-positive recall > 0").

Each recall is the mean over queries. Scores are cosine similarities of L2-normalised embeddings.

How the blocks work: rather than a running top-k per query, each query keeps a running *rank*:
the number of candidates that come before its positive. A candidate comes before the positive
when it scores strictly higher, or scores the same and has a lower index (the order a stable sort
gives; CLIP_benchmark's `torch.topk` leaves the order of ties open). For image -> text the positive
is the image's best caption (highest score, lowest index among equal scores), which is the caption
of smallest rank, so "any caption in the top k" is "best caption's rank < k"; the other captions of
the same image are never counted as coming before it. Each [text block x image block] score tile
is computed once and serves both directions (its rows: text -> image, its columns: image ->
text), so every k costs nothing extra and memory is O(block_size^2), not O(N x M).
`blocked_topk` (a true running top-k with the same order) lists the retrieved items for
`--dump-predictions`; tests pin that it agrees with the ranks.

Exact scores: a score is defined as the float64 dot product rounded to float32. A float32 GEMM may
round a dot product differently depending on the shape of the call, which would make a tiled result
differ from a dense one on near-ties; float64 sums differ by ~1e-16 at most and round to the same
float32. The tiles still run as fast float32 GEMMs: an entry whose float32 value lies within the
GEMM's worst-case error bound (D x 2^-24 x |a| |b|, doubled) of the value it is compared with is
recomputed in float64, so every comparison decides as the exact score would (TF32 is switched off
for these products). The blocked and the dense computations therefore agree exactly.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]
DEFAULT_BLOCK = 2048


def _tensor(x: Array, name: str, device: Union[str, torch.device]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or infinity: the model produced non-finite features")
    return t.to(device=device, dtype=torch.float32)


def _index(text_to_image: Array, num_texts: int, num_images: int, device) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if idx.shape != (num_texts,):
        raise ValueError(f"text_to_image must be [M] with M = {num_texts} (texts), got shape {tuple(idx.shape)}")
    if num_texts and (idx.min() < 0 or idx.max() >= num_images):
        raise ValueError(
            f"text_to_image must index images in [0, {num_images}); got {int(idx.min())}..{int(idx.max())}"
        )
    counts = torch.bincount(idx, minlength=num_images)
    if num_images and counts.min() == 0:
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"{int((counts == 0).sum())} images have no caption (e.g. images {missing}); every image needs one"
        )
    return idx.to(device)


def scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Cosine scores [Q, C] float32 of normalised [Q, D] and [C, D], summed in float64."""
    return (queries.double() @ candidates.double().T).float()


def _gemm_error_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """A bound on |float32 GEMM - exact| for rows of `a` against rows of `b`, plus rounding slack."""
    u = 2.0**-24
    return 2.0 * a.shape[1] * u * float(a.norm(dim=1).max()) * float(b.norm(dim=1).max()) + 4 * u


def pair_scores(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Row-wise scores [N] float32 of [N, D] and [N, D], summed in float64 like `scores`
    (`chunk` rows at a time, so the float64 copies stay small)."""
    out = torch.empty(len(a), dtype=torch.float32, device=a.device)
    for start in range(0, len(a), chunk):
        out[start : start + chunk] = (
            (a[start : start + chunk].double() * b[start : start + chunk].double()).sum(dim=1).float()
        )
    return out


def positive_scores(images: torch.Tensor, texts: torch.Tensor, idx: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Score [M] of each text with its own image, without an [M, D] gather of the images."""
    out = torch.empty(len(texts), dtype=torch.float32, device=texts.device)
    for start in range(0, len(texts), chunk):
        out[start : start + chunk] = pair_scores(
            texts[start : start + chunk], images[idx[start : start + chunk]], chunk
        )
    return out


def best_caption(
    image_emb: Array, text_emb: Array, text_to_image: Array, device: Union[str, torch.device] = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's best caption [N] long and its score [N] float32 (ties: lowest text index)."""
    images = _tensor(image_emb, "image embeddings", device)
    texts = _tensor(text_emb, "text embeddings", device)
    idx = _index(text_to_image, len(texts), len(images), device)
    return _best_caption(positive_scores(images, texts, idx), idx)


def _best_caption(pos: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each text's positive score [M] and image index [M]: each image's best caption and score."""
    image_of = idx.cpu().numpy()
    order = np.lexsort((np.arange(len(image_of)), -pos.cpu().numpy(), image_of))
    first = np.ones(len(order), dtype=bool)
    first[1:] = image_of[order][1:] != image_of[order][:-1]
    best = torch.as_tensor(order[first], device=idx.device)  # ordered by image index
    return best, pos[best]


@torch.no_grad()
def retrieval_ranks(
    image_emb: Array,
    text_emb: Array,
    text_to_image: Array,
    *,
    block_size: int = DEFAULT_BLOCK,
    device: Union[str, torch.device] = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Blocked ranks: (rank of each text's image [M], rank of each image's best caption [N]).

    image_emb [N, D], text_emb [M, D]: L2-normalised; text_to_image [M]: image index of each text.
    Peak memory beyond the inputs: a few [block_size, block_size] tiles.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    images = _tensor(image_emb, "image embeddings", device)
    texts = _tensor(text_emb, "text embeddings", device)
    idx = _index(text_to_image, len(texts), len(images), device)
    pos = positive_scores(images, texts, idx)
    best, best_score = _best_caption(pos, idx)

    text_ranks = torch.zeros(len(texts), dtype=torch.long, device=device)
    image_ranks = torch.zeros(len(images), dtype=torch.long, device=device)
    eps = _gemm_error_bound(texts, images)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the error bound assumes true float32 products
    try:
        # One score tile serves both directions: rows for text -> image, columns for image -> text.
        for t0 in range(0, len(texts), block_size):
            t_idx = torch.arange(t0, min(t0 + block_size, len(texts)), device=device)
            t_img, t_score = idx[t_idx, None], pos[t_idx, None]
            for i0 in range(0, len(images), block_size):
                i_idx = torch.arange(i0, min(i0 + block_size, len(images)), device=device)
                b_idx, b_score = best[i_idx][None, :], best_score[i_idx][None, :]
                s = texts[t_idx] @ images[i_idx].T  # [texts, images] float32
                near = ((s - t_score).abs() <= eps) | ((s - b_score).abs() <= eps)
                r, c = near.nonzero(as_tuple=True)
                if len(r):  # close calls: the exact score decides
                    s[r, c] = pair_scores(texts[t_idx[r]], images[i_idx[c]])
                own = t_img == i_idx[None, :]  # the text's own image
                # text -> image: images before the text's own image (never the image itself)
                before = (s > t_score) | ((s == t_score) & (i_idx[None, :] < t_img))
                text_ranks[t_idx] += (before & ~own).sum(dim=1)
                # image -> text: texts before the image's best caption (never its own captions)
                before = (s > b_score) | ((s == b_score) & (t_idx[:, None] < b_idx))
                image_ranks[i_idx] += (before & ~own).sum(dim=0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return text_ranks.cpu().numpy(), image_ranks.cpu().numpy()


@torch.no_grad()
def dense_retrieval_ranks(
    image_emb: Array, text_emb: Array, text_to_image: Array, sort_rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The same ranks from the full [M, N] score matrix and a stable sort of each row / column.

    The way open_clip and CLIP_benchmark hold it (one dense matrix, O(N x M) memory); kept as the
    reference the blocked computation is tested and benchmarked against. Scores come from the
    same `scores` function (row chunks, so the float64 temporary stays small); the sorts run
    `sort_rows` rows at a time.
    """
    images = _tensor(image_emb, "image embeddings", "cpu")
    texts = _tensor(text_emb, "text embeddings", "cpu")
    idx = _index(text_to_image, len(texts), len(images), "cpu").numpy()
    s = np.empty((len(texts), len(images)), dtype=np.float32)  # the dense matrix
    for r in range(0, len(texts), sort_rows):
        s[r : r + sort_rows] = scores(texts[r : r + sort_rows], images).numpy()
    text_ranks = np.empty(len(texts), dtype=np.int64)
    for r in range(0, len(texts), sort_rows):
        order = np.argsort(-s[r : r + sort_rows], axis=1, kind="stable")
        text_ranks[r : r + sort_rows] = (order == idx[r : r + sort_rows, None]).argmax(axis=1)
    image_ranks = np.empty(len(images), dtype=np.int64)
    for c in range(0, len(images), sort_rows):
        order = np.argsort(-s[:, c : c + sort_rows].T, axis=1, kind="stable")  # [images, texts]
        hits = idx[order] == np.arange(c, c + order.shape[0])[:, None]
        image_ranks[c : c + sort_rows] = hits.argmax(axis=1)
    return text_ranks, image_ranks


def recall_from_ranks(
    text_ranks: np.ndarray, image_ranks: np.ndarray, recall_k: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """CLIP_benchmark's metric names from the two rank arrays."""
    metrics: dict[str, float] = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = float(np.mean(np.asarray(text_ranks) < k))
        metrics[f"text_retrieval_recall@{k}"] = float(np.mean(np.asarray(image_ranks) < k))
    return metrics


def retrieval_metrics(
    image_emb: Array,
    text_emb: Array,
    text_to_image: Array,
    *,
    recall_k: Sequence[int] = (1, 5, 10),
    block_size: int = DEFAULT_BLOCK,
    device: Union[str, torch.device] = "cpu",
) -> dict[str, float]:
    """`image_retrieval_recall@k` and `text_retrieval_recall@k` for each k (blocked)."""
    text_ranks, image_ranks = retrieval_ranks(image_emb, text_emb, text_to_image, block_size=block_size, device=device)
    return recall_from_ranks(text_ranks, image_ranks, recall_k)


@torch.no_grad()
def blocked_topk(
    queries: Array,
    candidates: Array,
    k: int,
    *,
    block_size: int = DEFAULT_BLOCK,
    device: Union[str, torch.device] = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k over candidate blocks: (indices [Q, k] int64, scores [Q, k] float32).

    Order: score descending, index ascending among equal scores (the ranks' rule). Memory:
    [block, block] tiles plus [Q, k].
    """
    q_all = _tensor(queries, "queries", device)
    c_all = _tensor(candidates, "candidates", device)
    k = min(k, len(c_all))
    out_idx = np.empty((len(q_all), k), dtype=np.int64)
    out_val = np.empty((len(q_all), k), dtype=np.float32)
    for q0 in range(0, len(q_all), block_size):
        q = q_all[q0 : q0 + block_size]
        run_val = torch.empty((len(q), 0), device=device)
        run_idx = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for c0 in range(0, len(c_all), block_size):
            s = scores(q, c_all[c0 : c0 + block_size])
            # Stable sorts keep equal scores in index order; the running entries come first
            # and have lower indices than this block, so the merge keeps the rule too.
            v, i = torch.sort(s, dim=1, descending=True, stable=True)
            v, i = v[:, :k], i[:, :k] + c0
            v, order = torch.sort(torch.cat([run_val, v], dim=1), dim=1, descending=True, stable=True)
            run_val = v[:, :k]
            run_idx = torch.gather(torch.cat([run_idx, i], dim=1), 1, order)[:, :k]
        out_idx[q0 : q0 + block_size] = run_idx.cpu().numpy()
        out_val[q0 : q0 + block_size] = run_val.cpu().numpy()
    return out_idx, out_val


def evaluate_retrieval(
    model: torch.nn.Module,
    images: Sequence,
    captions: Sequence,
    *,
    recall_k: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: str = "cpu",
    block_size: int = DEFAULT_BLOCK,
    decode_threads: int = 0,
):
    """Retrieval of in-memory pairs, in this process (no Ray); returns an `EvalResult`.

    images: encoded bytes, paths/URLs or PIL images; captions: one string or a list of strings
    per image. Images that fail to decode are skipped (with their captions) and counted.
    """
    from evaluation.embed import ImageEmbedder, TextEmbedder, embed_local, iter_slices, normalize
    from evaluation.results import EvalResult, skipped_summary

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption entries")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    caption_lists = [[c] if isinstance(c, str) else list(c) for c in captions]
    was_training = model.training
    try:
        keys = np.arange(len(images)).astype(str)
        out = embed_local(
            ImageEmbedder(model, device=device, decode_threads=decode_threads),
            iter_slices({"image": images, "key": keys}, batch_size),
        )
        ok = out["ok"]
        kept = [caps for caps, good in zip(caption_lists, ok) if good]
        texts = [t for caps in kept for t in caps]
        text_to_image = np.repeat(np.arange(len(kept)), [len(c) for c in kept])
        text_features = embed_local(TextEmbedder(model, device=device), iter_slices({"text": texts}, batch_size))[
            "text_features"
        ]
    finally:
        model.train(was_training)
    if not ok.any():
        raise ValueError(f"none of the {len(images)} images could be decoded: {out['error'][0]}")
    text_ranks, image_ranks = retrieval_ranks(
        normalize(out["image_features"][ok]),
        normalize(text_features),
        text_to_image,
        block_size=block_size,
        device=device,
    )
    return EvalResult(
        task="retrieval",
        metrics=recall_from_ranks(text_ranks, image_ranks, recall_k),
        num_samples=int(ok.sum()),
        skipped=skipped_summary(list(out["key"][~ok]), list(out["error"][~ok])),
        details={"num_images": int(ok.sum()), "num_texts": len(texts)},
    )
