import pytest
import torch

from ssni import SSNI, Calibration, Defense, DiffPure, GNS, SampleNoise, VPSchedule, make_reweight, score_norm
from ssni.errors import ConfigError, InputError


def build(unet, classifier, ssni_kind=None, votes=1, purifier=None):
    purifier = purifier or DiffPure(unet, t_star=20, steps=4)
    ssni = None
    if ssni_kind:
        reference = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            cal = Calibration.fit(score_norm(unet, VPSchedule(), reference, SampleNoise.from_ids(5, range(8)), 3))
        ssni = SSNI(unet, make_reweight(ssni_kind, cal), n_levels=3)
    return Defense(classifier, purifier, ssni, seed=1, votes=votes).eval()


@pytest.mark.parametrize("ssni_kind", [None, "sigmoid", "linear"])
def test_logits_shape_and_gradient_reaches_input(ssni_kind, tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier, ssni_kind)
    x = images.clone().requires_grad_(True)
    logits = defense(x)
    assert logits.shape == (5, 10)
    logits[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_checkpointing_covers_the_score_norm_pass_with_the_same_gradient(tiny_unet, tiny_classifier, images):
    """A defense with checkpointing keeps only call inputs for the backward, score-norm rows included,
    and gives the gradient of the defense without it."""
    from ssni.evaluate.units import saved_bytes

    grads, kept = {}, {}
    for checkpoint in (False, True):
        defense = build(tiny_unet, tiny_classifier, "sigmoid", purifier=DiffPure(tiny_unet, t_star=20, steps=4,
                                                                                  checkpoint=checkpoint))
        x = images.clone().requires_grad_(True)
        defense(x, draw=0)[:, 0].sum().backward()
        grads[checkpoint] = x.grad
        kept[checkpoint] = saved_bytes(lambda: defense.purify(x, draw=0))
    assert torch.allclose(grads[False], grads[True], rtol=1e-4, atol=1e-5)
    assert kept[True] * 3 < kept[False]


def test_ssni_gradient_reaches_score_network_through_relaxed_levels(tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier, "sigmoid")
    purifier_only = DiffPure(tiny_unet, t_star=20, steps=4)
    x = images.clone().requires_grad_(True)
    noise = defense._noise(x, None, 0, 0)
    lv = defense.ssni(x, purifier_only.t_stars, noise)
    assert lv.t_relaxed is not None and lv.t_relaxed.requires_grad
    lv.t_relaxed.sum().backward()
    assert x.grad.abs().sum() > 0
    defense.ssni.differentiable = False
    assert defense.ssni(images, purifier_only.t_stars, noise).t_relaxed is None


def test_explain_reports_score_norms_and_levels(tiny_unet, tiny_classifier, images):
    out = build(tiny_unet, tiny_classifier, "sigmoid").explain(images)
    assert out["score_norm"].shape == (5,)
    assert out["t_star"].shape == (1, 5) and out["t_star"].min() >= 1 and out["t_star"].max() <= 20 - 1 + 5
    plain = build(tiny_unet, tiny_classifier).explain(images)
    assert plain["score_norm"] is None and torch.all(plain["t_star"] == 20)


def test_draws_are_fresh_unless_fixed(tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier)
    with torch.no_grad():
        a, b = defense(images), defense(images)
        c, d = defense(images, draw=7), defense(images, draw=7)
    assert not torch.allclose(a, b) and torch.equal(c, d)


def test_results_follow_sample_ids_not_positions(tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier, "sigmoid")
    ids = torch.tensor([4, 8, 15, 16, 23])
    with torch.no_grad():
        full = defense(images, sample_ids=ids, draw=0)
        part = defense(images[2:], sample_ids=ids[2:], draw=0)
    assert torch.allclose(full[2:], part, atol=1e-4)


def test_gns_votes_and_majority_prediction(tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier, "sigmoid", votes=3,
                    purifier=GNS(tiny_unet, levels=(3, 6), steps=3))
    with torch.no_grad():
        votes = [tiny_classifier(defense.purify(images, None, 0, v)[0]).argmax(1) for v in range(3)]
        predicted = defense.predict(images, draw=0)
    stacked = torch.stack(votes)
    for i in range(5):
        counts = torch.bincount(stacked[:, i], minlength=10)
        assert counts[predicted[i]] == counts.max()


def test_defense_input_errors(tiny_unet, tiny_classifier, images):
    defense = build(tiny_unet, tiny_classifier)
    with pytest.raises(InputError):
        defense(images * 3)
    with pytest.raises(InputError):
        defense(images[:, :, :, :0])
    with pytest.raises(ConfigError):
        defense(images, sample_ids=torch.arange(3))
    with pytest.raises(ConfigError):
        Defense(tiny_classifier, DiffPure(tiny_unet), votes=0)


def test_inputs_the_networks_cannot_take_get_clear_errors_and_float64_is_converted():
    from ssni.checkpoints.registry import default_weights_dir, load_named
    from ssni.errors import InputError

    unet, cnn = load_named("mnist-unet", default_weights_dir()), load_named("mnist-cnn", default_weights_dir())
    defense = Defense(cnn, DiffPure(unet, t_star=20, steps=2), image_size=28).eval()
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(InputError, match="expect 1 channel"):
        defense(torch.rand(2, 3, 28, 28))
    with pytest.raises(InputError, match="28x28"):
        defense(torch.rand(2, 1, 32, 32))
    with torch.no_grad():
        assert torch.allclose(defense(x.double(), draw=0), defense(x, draw=0))


def test_batch_ids_are_positions_or_the_given_ids():
    from ssni.rng import batch_ids
    x = torch.zeros(3, 1, 4, 4)
    assert torch.equal(batch_ids(x, None), torch.arange(3))
    assert torch.equal(batch_ids(x, [5, 2, 9]), torch.tensor([5, 2, 9]))
    ids = torch.tensor([4, 1, 0])
    assert batch_ids(x, ids) is ids and batch_ids(x, ids, cpu=True).device.type == "cpu"
