"""The settings that the data decides where the config says "auto" (0 or -1): input size, augmented views, crop range,
epochs, and the head's weight decay and accuracy stop."""

from __future__ import annotations

from dataclasses import replace

from fruitlens.config import RRC_MIN_AREA, TrainConfig
from fruitlens.models.registry import get_spec, has_pretrained_weights

STUDIO_MAX_SIDE = 128  # a median shorter side up to this: small studio shots of one fruit (Fruits-360: 100 px)
HEAD_EPOCHS = 40  # a linear head on cached features, before the solver takes it to convergence (calibrate.py)
IMAGE_EPOCHS = 30  # a phase on images: minutes an epoch on a CPU


STUDIO_PHOTO_SIZE = 224  # studio shots, unless --fast: the size at which their model holds up on photos


def auto_image_size(median_side: int, studio: bool = False, fast: bool = False) -> int:
    """Input size from the data's median shorter side, and from where the model will be used.

    Small studio shots of one fruit on white (Fruits-360: 100 px) are upscaled to 224 px, ImageNet's size: the
    model will meet photos, and a Fruits-360 model read GroceryStore's supermarket photos 4.3% right at its own
    96 px and 30.8% at 224 px (``benchmarks/RESULTS.md``). ``fast`` keeps their own size, floored to a multiple of
    32 (96 px: several times quicker, and as good on the data's own test split). Other small images keep their own
    size too. Photos in which the fruit is a small part of a cluttered scene gain from a larger input than their own
    size (GroceryStore, median 348 px: 54% test accuracy at 224 px, 73% at 320, 77% at 448 with frozen MobileNetV2
    features), so they get 1.25x their size rounded up to a multiple of 32, at most 448.
    """
    if median_side <= STUDIO_MAX_SIDE:
        own = max(64, (median_side // 32) * 32)
        return STUDIO_PHOTO_SIZE if studio and not fast else own
    return max(160, min(448, -(-int(median_side * 1.25) // 32) * 32))


def auto_crop_scale(median_side: int) -> float:
    """Smallest random crop (fraction of the image area), with the same split between kinds of data as the size.

    Photos get torchvision's RandomResizedCrop range (8-100%): a close-up crop of a display looks like a close-up
    photo of the same fruit (GroceryStore, whose held-out photos are closer than its training photos: 73.3% -> 75.7%
    test accuracy, mean of 3 seeds). Small studio shots of one whole fruit keep 60-100%: a crop of a few percent
    of a Fruits-360 image shows skin only, which no test image does.
    """
    return 0.6 if median_side <= STUDIO_MAX_SIDE else RRC_MIN_AREA


STUDIO_VIEWS = 3  # augmented views of each studio shot at photo size: photos read from them, not from the clean view


def auto_feature_views(studio_at_photo_size: bool) -> int:
    """Augmented views per image in the feature cache. One for most data. Studio shots upscaled for photos get
    three: a Fruits-360 model read 31.9% of GroceryStore's photos right with one view, below the plain recipe's
    39.7%, which sees fresh augmented images every epoch (``benchmarks/RESULTS.md``); each view costs one more pass of
    the backbone (about 70 s for Fruits-360 on 2 CPU cores)."""
    return STUDIO_VIEWS if studio_at_photo_size else 1


STUDIO_WEIGHT_DECAY = 1e-3  # the head's, for studio shots upscaled for photos
WEIGHT_DECAY = 1e-4
TARGET_ACC = 0.98  # the original's stop


def auto_head_recipe(studio_head: bool) -> tuple[float, float]:
    """``(weight_decay, target_acc)``: the original's recipe (weight decay 1e-4, stop at 98% accuracy), except for
    ``studio_head``, a head alone on cached features of studio shots upscaled for photos. Those reach 98% on their
    own validation split within two epochs, long before the head has settled. With no 98% stop and weight decay
    1e-3, a Fruits-360 head on the last layer's cached features read GroceryStore's photos 41.5% right instead of
    35.1% (balanced 32.5% instead of 27.7%) and Fruits-360's test split 99.6% instead of 99.0% (an earlier run);
    weight decay 1e-2 read the photos as well and the test split less well (99.3%), 3e-2 both less well. On block
    17's standardised features, which such a head now reads (``auto_feature_layer``), the recipe matters less: 43.0%
    against 42.5% (balanced 34.1% against 33.2%), test split 99.5% against 99.0% (``benchmarks/bench_domain.py``,
    one run; RESULTS.md, "Studio shots and photos"). There, on a sixth of the frames, weight decay 1e-4 and 1e-3
    read the photos alike (43.6%, 43.8%), 1e-2 and 3e-2 less well (41.3%, 40.5%; ``benchmarks/bench_layers.py``)."""
    return (STUDIO_WEIGHT_DECAY, 0.0) if studio_head else (WEIGHT_DECAY, TARGET_ACC)


def auto_feature_layer(studio_head: bool, model: str) -> str:
    """``mid`` (an earlier block's features, standardised on the training features) for ``studio_head`` where the
    model has one (MobileNetV2: block 17, 320 channels), else ``last``. The last layer's 1280 channels sum up
    ImageNet's object classes, and on a white background a photo's features fall near a few studio classes that
    absorb them (Conference pears read as Apple Red 1, kiwi as Orange). Block 17's read GroceryStore's photos 43.8%
    right against the last layer's 38.5% (balanced 34.2% against 30.1%; raw block-17 features 39.4%: the
    standardisation is half the gain; blocks 13-16, other poolings and blocks side by side were lower), 2,109
    Fruits-360 frames, two seeds (``benchmarks/bench_layers.py``); in a full run 43.0% against 41.5% (balanced 34.1%
    against 32.5%, ``benchmarks/bench_domain.py``, one run: inside its noise). Other data keeps the last layer: on
    GroceryStore's photos it read the 111 held-out photos 75.4% right against block 17's 73.0% (3 seeds each, ECE
    0.104 against 0.120; ``benchmarks/bench_train.py layers``)."""
    return "mid" if studio_head and get_spec(model).mid_block is not None else "last"


def pretrained(cfg: TrainConfig) -> bool:
    """Starts from pretrained weights, so that phase 1 trains the head alone (else the whole network trains)."""
    return cfg.model.weights != "none" and has_pretrained_weights(cfg.model.name)


def auto_epochs(cfg: TrainConfig) -> int:
    """Max epochs of the first phase where ``fit.epochs`` is 0.

    A head on cached features trained to convergence read new photos better than one stopped early (GroceryStore: at
    30 epochs its validation loss was still falling; to convergence 76.3% instead of 75.7% test accuracy, ECE 0.11
    instead of 0.14). The solver now takes the head there after its epochs (``pipelines/calibrate.py``: ``_refit``,
    the same optimum from any start), so the epochs only start it and draw the curves: 40 at most (Fruits-360's head
    used to take 85 s of a run for up to 200). Phases on images are minutes an epoch on a CPU: the original's 30.
    """
    return HEAD_EPOCHS if pretrained(cfg) and cfg.fit.feature_cache else IMAGE_EPOCHS


def resolve(cfg: TrainConfig, median_side: int, studio: bool = False) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with every auto setting decided, and one sentence per decision for the log. ``studio``: the data is
    studio shots on white (``DomainNote.studio_only``)."""
    notes = []
    model, augment, fit = cfg.model, cfg.augment, cfg.fit
    fixed = get_spec(model.name).fixed_size
    if not model.img_size and fixed:
        model = replace(model, img_size=fixed)
        notes.append(f"input size {fixed} px: the only size {model.name} takes")
    elif not model.img_size:
        model = replace(model, img_size=auto_image_size(median_side, studio, model.fast))
        why = (
            " for photos: studio shots on white, upscaled (--fast keeps their own size: quicker, far worse on photos)"
            if studio and median_side <= STUDIO_MAX_SIDE and not model.fast
            else ""
        )
        notes.append(
            f"input size {model.img_size} px, picked from the data (median shorter side {median_side} px){why}"
        )
    photo_size = studio and median_side <= STUDIO_MAX_SIDE and model.img_size >= STUDIO_PHOTO_SIZE
    if fit.feature_views < 0:
        fit = replace(fit, feature_views=auto_feature_views(photo_size))
        notes.append(f"{fit.feature_views} augmented view(s) of each training image in the feature cache")
    # measured for the head alone on cached features; phases that train the backbone keep the original's recipe
    head_only = photo_size and pretrained(cfg) and fit.feature_cache and not fit.fine_tune_blocks
    decay, target = auto_head_recipe(head_only)
    if fit.weight_decay < 0 or fit.target_acc < 0:
        fit = replace(
            fit,
            weight_decay=decay if fit.weight_decay < 0 else fit.weight_decay,
            target_acc=target if fit.target_acc < 0 else fit.target_acc,
        )
        if head_only:
            notes.append(
                f"weight decay {fit.weight_decay:g}, accuracy stop "
                f"{'off' if not fit.target_acc else f'at {fit.target_acc:.0%}'}: a head that fits studio shots "
                "to convergence reads photos better"
            )
    if model.feature_layer == "auto":
        model = replace(model, feature_layer=auto_feature_layer(head_only, model.name))
        if model.feature_layer == "mid":
            notes.append(
                "features of a mid-level block, standardised: a head on studio shots reads photos better "
                "from them than from the last layer (--feature-layer last for the last layer)"
            )
    if not augment.crop_scale:
        augment = replace(augment, crop_scale=auto_crop_scale(median_side))
        notes.append(f"random crops of {100 * augment.crop_scale:.0f}-100% of the image area")
    if not fit.epochs:
        fit = replace(fit, epochs=auto_epochs(cfg))
        notes.append(f"at most {fit.epochs} epochs for the first phase (early stopping ends it sooner)")
    return replace(cfg, model=model, augment=augment, fit=fit).validated(), notes
