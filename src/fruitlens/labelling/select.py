"""Which photos to label: the typical and diverse ones first, then where the model is unsure.

Cold start (no photo of the setting labelled yet): k-means on the photos' features with as many clusters as labels
to spend, and the photo nearest each centre (the most typical photo of each kind of photo the pool holds), ordered
by how many photos its cluster stands for. The photos the model is least sure of are worse than random at this
stage, the cold-start problem of active learning (Hacohen et al., ICML 2022, "TypiClust"): they are the odd ones.
Measured on GroceryStore's photos with a Fruits-360 model (``benchmarks/bench_labels.py``): typical photos beat
random ones at every budget.

Once photos of the setting are labelled (``labelled``), clusters that already hold one are covered: the typical
picks go to the largest uncovered clusters, and a share of the budget goes to the photos the model is least sure
of (smallest margin between its top two classes), one per cluster.

Near copies (bursts, the same shelf twice) count once: each group of copies is one candidate, its most central
photo, standing for the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMBED_DIMS = 64  # k-means on 64 principal components of the features where there are many photos
PCA_FROM = 20_000  # photos: below this, k-means runs on the features themselves (measured: PCA cost 3 points here)
UNCERTAIN_SHARE = 0.3  # of the budget, once photos of the setting are labelled


@dataclass(frozen=True)
class Pick:
    """One photo to label, and why it was picked."""

    index: int  # into the photos given
    why: str
    cluster_size: int  # photos (near copies included) this pick stands for
    near_copies: int = 0  # other photos that are near copies of it


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The features standardised over the photos (no dimension dominates by its scale), then L2-normalised; from
    ``PCA_FROM`` photos up, on their ``EMBED_DIMS`` principal components (k-means stays seconds at 100,000)."""
    z = np.asarray(features, dtype=np.float32)
    z = (z - z.mean(0)) / (z.std(0) + 1e-3)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    if z.shape[1] > EMBED_DIMS and len(z) >= PCA_FROM:
        from sklearn.decomposition import PCA

        z = PCA(EMBED_DIMS, svd_solver="randomized", random_state=seed).fit_transform(z).astype(np.float32)
    return z


def _kmeans(z: np.ndarray, k: int, weight: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row, the centres)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    km = (
        KMeans(k, n_init=3, random_state=seed)
        if len(z) <= 20_000
        else MiniBatchKMeans(k, n_init=3, random_state=seed, batch_size=4096)
    )
    labels = km.fit_predict(z, sample_weight=weight)
    return labels, km.cluster_centers_


def _representatives(z: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most central photo of each near-copy group, the group's size)."""
    reps, sizes = [], []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        centre = z[members].mean(0)
        reps.append(members[np.argmin(((z[members] - centre) ** 2).sum(1))])
        sizes.append(len(members))
    order = np.argsort(reps)
    return np.asarray(reps)[order], np.asarray(sizes)[order]


def _covered(z: np.ndarray, cluster: np.ndarray, centres: np.ndarray, labelled: np.ndarray) -> set[int]:
    """Clusters a labelled photo covers: one lies nearer the centre than the cluster's own median photo (k-means
    splits a kind of photo with several labelled photos in it; each part is covered)."""
    out = set()
    nearest = ((labelled[:, None, :] - centres[None]) ** 2).sum(-1).min(0)
    for c in range(len(centres)):
        members = z[cluster == c]
        radius = np.median(((members - centres[c]) ** 2).sum(1)) if len(members) else 0.0
        if nearest[c] <= radius:
            out.add(c)
    return out


def pick_photos(
    features: np.ndarray,
    budget: int,
    *,
    groups: np.ndarray | None = None,
    margins: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    uncertain_share: float = UNCERTAIN_SHARE,
    seed: int = 0,
) -> list[Pick]:
    """``budget`` photos to label (fewer when the photos hold fewer distinct ones), most useful first.

    ``features``: (n, d) features of the candidate photos; ``groups``: a near-copy group id per photo;
    ``margins``: the model's top-1 minus top-2 probability per photo; ``labelled``: (m, d) features of photos of the
    same setting labelled already (then a share of the budget goes to the least sure photos).
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1 but received {budget}")
    n = len(features)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    has_labelled = labelled is not None and len(labelled) > 0
    z_all = embed(np.concatenate([features, labelled]) if has_labelled else features, seed)
    z, z_lab = z_all[:n], z_all[n:]
    reps, sizes = _representatives(z, groups)
    if budget >= len(reps):
        order = np.argsort(-sizes, kind="stable")
        return [
            Pick(int(reps[i]), f"one of only {len(reps)} distinct photos", int(sizes[i]), int(sizes[i] - 1))
            for i in order
        ]
    n_unsure = int(round(uncertain_share * budget)) if has_labelled and margins is not None else 0
    if has_labelled:
        rows = np.concatenate([z[reps], z_lab])
        weight = np.concatenate([sizes, np.ones(len(z_lab))]).astype(np.float64)
        k = min(len(rows), budget - n_unsure + len(z_lab))
        cluster, centres = _kmeans(rows, k, weight, seed)
        cluster = cluster[: len(reps)]
        covered = _covered(z[reps], cluster, centres, z_lab)
    else:
        cluster, centres = _kmeans(z[reps], budget, sizes.astype(np.float64), seed)
        covered = set()
    size_of = np.bincount(cluster, weights=sizes, minlength=len(centres))
    picks: list[Pick] = []
    taken: set[int] = set()
    for c in np.argsort(-size_of, kind="stable"):
        if len(picks) >= budget - n_unsure:
            break
        members = np.flatnonzero(cluster == c)
        if c in covered or not len(members):
            continue
        best = members[np.argmin(((z[reps[members]] - centres[c]) ** 2).sum(1))]
        taken.add(int(best))
        picks.append(
            Pick(
                int(reps[best]), f"typical of {int(size_of[c])} photo(s) like it", int(size_of[c]), int(sizes[best] - 1)
            )
        )
    if len(picks) < budget and margins is not None:  # the least sure photos, one per cluster
        used_clusters: set[int] = set()
        for i in np.argsort(np.asarray(margins)[reps], kind="stable"):
            if len(picks) >= budget:
                break
            if int(i) in taken or int(cluster[i]) in used_clusters:
                continue
            taken.add(int(i))
            used_clusters.add(int(cluster[i]))
            picks.append(
                Pick(
                    int(reps[i]),
                    f"the model is unsure (margin {float(margins[reps[i]]):.2f})",
                    int(size_of[cluster[i]]),
                    int(sizes[i] - 1),
                )
            )
    if len(picks) < budget:  # every cluster is covered or picked: the rest by size, then by order
        for i in np.argsort(-size_of[cluster], kind="stable"):
            if len(picks) >= budget:
                break
            if int(i) not in taken:
                taken.add(int(i))
                picks.append(Pick(int(reps[i]), "to fill the budget", int(size_of[cluster[i]]), int(sizes[i] - 1)))
    return picks
