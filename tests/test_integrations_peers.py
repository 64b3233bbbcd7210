"""The drop-in modules of lossforge_kernels.integrations against the peer libraries' own losses.

open_clip's package __init__ imports its models (torchvision); its loss module imports only torch,
so it is loaded from the installed file by itself. Each peer is skipped when not installed.
"""
import functools
import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from lossforge_kernels.integrations import open_clip as lf_open_clip
from lossforge_kernels.integrations import sentence_transformers as lf_st

BACKENDS = ["reference", "triton"]
RTOL, ATOL = 1e-5, 1e-6


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_loss():
    return _open_clip_loss_module()


@pytest.fixture(scope="module")
def st_losses():
    return pytest.importorskip("sentence_transformers.sentence_transformer.losses")


@pytest.fixture(scope="module")
def st_util():
    return pytest.importorskip("sentence_transformers.util")


class _Passthrough(nn.Module):
    """A stand-in encoder: the column's 'x' is its sentence embedding, so gradients reach the inputs."""

    def forward(self, features):
        return {**features, "sentence_embedding": features["x"]}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _loss_and_grads(fn, inputs):
    leaves = _leaves(*inputs)
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _assert_same(ours, theirs, inputs):
    loss, grads = _loss_and_grads(ours, inputs)
    want_loss, want_grads = _loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
    for i, (grad, want) in enumerate(zip(grads, want_grads)):
        if want is None:
            continue
        assert grad is not None, f"input {i} got no gradient"
        torch.testing.assert_close(grad, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"input {i}: {m}")


def _unit_rows(b, d, generator):
    return nn.functional.normalize(torch.randn(b, d, generator=generator), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_matches_open_clip(open_clip_loss, backend):
    g = torch.Generator().manual_seed(0)
    inputs = (_unit_rows(6, 8, g), _unit_rows(6, 8, g), torch.tensor(1 / 0.07) + torch.rand((), generator=g))
    ours, theirs = lf_open_clip.ClipLoss(backend=backend), open_clip_loss.ClipLoss()
    _assert_same(ours, theirs, inputs)
    with_bias = lambda i, t, s: ours(i, t, s, torch.tensor(-2.0), output_dict=True)["contrastive_loss"]  # noqa: E731
    _assert_same(with_bias, lambda i, t, s: theirs(i, t, s, torch.tensor(-2.0)), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_loss_matches_open_clip(open_clip_loss, backend):
    g = torch.Generator().manual_seed(1)
    inputs = (_unit_rows(5, 8, g), _unit_rows(5, 8, g), 10 + torch.rand((), generator=g),
              -10 + torch.rand((), generator=g))
    _assert_same(lf_open_clip.SigLipLoss(backend=backend), open_clip_loss.SigLipLoss(), inputs)


def _columns(*tensors):
    return [{"x": t} for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("columns, similarity, scale, directions, partition", [
    (2, "cos_sim", 20.0, ("query_to_doc",), "joint"),
    (4, "cos_sim", 20.0, ("query_to_doc",), "joint"),
    (3, "dot_score", 1.0, ("query_to_doc",), "joint"),
    (2, "cos_sim", 20.0, ("query_to_doc", "doc_to_query"), "per_direction"),
    (3, "cos_sim", 20.0, ("query_to_doc", "doc_to_query"), "per_direction"),
])
def test_multiple_negatives_ranking_matches_sentence_transformers(st_losses, st_util, backend, columns, similarity,
                                                                  scale, directions, partition):
    g = torch.Generator().manual_seed(columns)
    inputs = [torch.randn(5, 8, generator=g) for _ in range(columns)]
    options = dict(scale=scale, similarity_fct=getattr(st_util, similarity), directions=directions,
                   partition_mode=partition)
    ours = lf_st.MultipleNegativesRankingLoss(_Passthrough(), backend=backend, **options)
    theirs = st_losses.MultipleNegativesRankingLoss(_Passthrough(), **options)
    _assert_same(lambda *xs: ours(_columns(*xs), None),
                 lambda *xs: theirs.compute_loss_from_embeddings(list(xs), None), inputs)


def _distance_metric(losses, name):
    functions = losses.BatchHardTripletLossDistanceFunction
    return {"euclidean": functions.euclidean_distance, "cosine": functions.cosine_distance,
            "squared": functools.partial(functions.euclidean_distance, squared=True)}[name]


TRIPLET_CASES = [("BatchHardTripletLoss", {}), ("BatchHardSoftMarginTripletLoss", {}),
                 ("BatchSemiHardTripletLoss", {}), ("BatchAllTripletLoss", {}),
                 ("BatchHardTripletLoss", {"margin": 0.5}), ("BatchSemiHardTripletLoss", {"margin": 0.5}),
                 ("BatchAllTripletLoss", {"margin": 0.5})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("name, options", TRIPLET_CASES)
def test_batch_triplet_losses_match_sentence_transformers(st_losses, backend, distance, name, options):
    g = torch.Generator().manual_seed(len(name) + len(distance))
    # every label at least twice (as sentence-transformers' label sampler gives) and distances of a few margins
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
    embeddings = torch.randn(10, 8, generator=g) * (0.3 if distance == "cosine" or "margin" in options else 1)
    options = dict(options, distance_metric=_distance_metric(st_losses, distance))
    ours = getattr(lf_st, name)(_Passthrough(), backend=backend, **options)
    theirs = getattr(st_losses, name)(_Passthrough(), **options)
    _assert_same(lambda x: ours(_columns(x), labels), lambda x: theirs.compute_loss_from_embeddings([x], labels),
                 (embeddings,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["BatchHardTripletLoss", "BatchSemiHardTripletLoss", "BatchAllTripletLoss"])
def test_batch_triplet_losses_take_the_class_size_promise(st_losses, backend, name):
    """max_class_size= (triplet_loss's promise, the K of P x K sampling: semi_hard and batch_all then take
    the register path on a GPU without reading the labels) changes no result, and a broken promise is
    refused by name where the labels can be read."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])  # classes of at most 3
    embeddings = torch.randn(10, 8, generator=torch.Generator().manual_seed(9))
    ours = getattr(lf_st, name)(_Passthrough(), max_class_size=3, backend=backend)
    theirs = getattr(st_losses, name)(_Passthrough())
    _assert_same(lambda x: ours(_columns(x), labels), lambda x: theirs.compute_loss_from_embeddings([x], labels),
                 (embeddings,))
    with pytest.raises(ValueError, match="max_class_size=2 was promised"):
        getattr(lf_st, name)(_Passthrough(), max_class_size=2, backend=backend)(_columns(embeddings), labels)


@pytest.mark.parametrize("name", ["BatchSemiHardTripletLoss", "BatchAllTripletLoss"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 5, 3, 3, 0, 4], list(range(10))])  # some or all labels once
def test_semi_hard_and_batch_all_match_with_lone_labels(st_losses, name, labels):
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor(labels)
    ours, theirs = getattr(lf_st, name)(_Passthrough()), getattr(st_losses, name)(_Passthrough())
    _assert_same(lambda x: ours(_columns(x), labels), lambda x: theirs.compute_loss_from_embeddings([x], labels),
                 (torch.randn(10, 8, generator=g),))


@pytest.mark.parametrize("name", ["BatchHardTripletLoss", "BatchHardSoftMarginTripletLoss"])
def test_batch_hard_with_a_single_label_matches_sentence_transformers(st_losses, name):
    labels = torch.full((6,), 3)
    ours, theirs = getattr(lf_st, name)(_Passthrough()), getattr(st_losses, name)(_Passthrough())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours(_columns(x), labels), theirs.compute_loss_from_embeddings([x], labels))


def test_bad_arguments_name_the_option():
    with pytest.raises(NotImplementedError, match="world_size"):
        lf_open_clip.ClipLoss(world_size=2)
    with pytest.raises(NotImplementedError, match="world_size"):
        lf_open_clip.SigLipLoss(world_size=4, rank=1)
    with pytest.raises(ValueError, match="dist_impl"):
        lf_open_clip.SigLipLoss(dist_impl="ring")
    model = _Passthrough()
    with pytest.raises(ValueError, match="similarity_fct"):
        lf_st.MultipleNegativesRankingLoss(model, similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="scale"):
        lf_st.MultipleNegativesRankingLoss(model, scale=0.0)
    with pytest.raises(NotImplementedError, match="hardness_mode"):
        lf_st.MultipleNegativesRankingLoss(model, hardness_mode="hard_negatives", hardness_strength=5.0)
    with pytest.raises(NotImplementedError, match="partition_mode"):
        lf_st.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"))
    with pytest.raises(NotImplementedError, match="directions"):
        lf_st.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"))
    with pytest.raises(NotImplementedError, match="gather_across_devices"):
        lf_st.MultipleNegativesRankingLoss(model, gather_across_devices=True)
    with pytest.raises(ValueError, match="sentence_features"):
        lf_st.MultipleNegativesRankingLoss(model)(_columns(torch.randn(4, 3)), None)
    with pytest.raises(ValueError, match="distance_metric"):
        lf_st.BatchAllTripletLoss(model, distance_metric=torch.cdist)
    with pytest.raises(ValueError, match="labels"):
        lf_st.BatchHardTripletLoss(model)(_columns(torch.randn(4, 3)), torch.zeros(5, dtype=torch.long))
