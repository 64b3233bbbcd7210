"""The transformers patch: a patched causal LM's training loss and every parameter's gradient equal the
model's own, with no (N, V) logits ever created; everything else runs the model's own forward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")
from lossforge_kernels.integrations import transformers as lf_hf  # noqa: E402

BACKENDS = ["triton", "reference"]
SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
# Softcaps small enough to bend these tiny models' logits (about 0.1): the cap changes the loss.
FAMILIES = {
    "Llama": (lambda **kw: transformers.LlamaConfig(**kw), "LlamaForCausalLM"),
    "Mistral": (lambda **kw: transformers.MistralConfig(**kw), "MistralForCausalLM"),
    "Qwen2": (lambda **kw: transformers.Qwen2Config(**kw), "Qwen2ForCausalLM"),
    "Qwen3": (lambda **kw: transformers.Qwen3Config(**kw), "Qwen3ForCausalLM"),
    "Gemma2": (lambda **kw: transformers.Gemma2Config(final_logit_softcapping=0.05, **kw), "Gemma2ForCausalLM"),
    "Gemma3": (lambda **kw: transformers.Gemma3TextConfig(final_logit_softcapping=0.05, **kw), "Gemma3ForCausalLM"),
    "Phi3": (lambda **kw: transformers.Phi3Config(pad_token_id=0, **kw), "Phi3ForCausalLM"),
}
FAMILIES = {name: spec for name, spec in FAMILIES.items() if hasattr(transformers, spec[1])}


def tiny(family, seed=0, **overrides):
    config_of, cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_of(**dict(SIZES, **overrides))
    config._attn_implementation = "eager"
    return getattr(transformers, cls)(config).float().train()


def batch(vocab=97, batch_size=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch_size, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding, ignored by the loss
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training(model, inputs, backend, **options):
    expected, expected_grads = loss_and_grads(model, inputs)
    lf_hf.patch(model, backend=backend, **options)
    try:
        got, got_grads = loss_and_grads(model, inputs)
    finally:
        lf_hf.unpatch(model)
    assert got.logits is None and expected.logits is not None
    assert type(got) is type(expected)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    assert got_grads.keys() == expected_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        # fp32 gradients that came back through the model in another summation order: each element within
        # 1e-5 of itself or of the tensor's largest (a sum that cancels keeps the others' rounding)
        atol = max(1e-7, 1e-5 * float(grad.abs().max()))
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_equal_the_models_own(family, backend):
    assert_same_training(tiny(family), batch(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["Gemma2", "Gemma3"])
def test_final_logit_softcapping_is_the_softcap(family, backend):
    model = tiny(family)
    capped = model(**batch()).loss
    model.config.final_logit_softcapping = None
    assert not torch.allclose(model(**batch()).loss, capped)  # the cap matters at these sizes
    model.config.final_logit_softcapping = 0.05
    assert_same_training(model, batch(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_labels_and_num_items_in_batch(backend):
    inputs = batch()
    shift_labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].clone()
    shift_labels[1, 4:7] = -100
    model = tiny("Llama")
    assert_same_training(model, dict(inputs, shift_labels=shift_labels), backend)
    assert_same_training(model, dict(inputs, num_items_in_batch=torch.tensor(7)), backend)
    assert_same_training(model, dict(inputs, shift_labels=shift_labels, num_items_in_batch=5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_to_keep(backend):
    inputs, model = batch(), tiny("Qwen2")
    assert_same_training(model, dict(inputs, logits_to_keep=5, labels=inputs["labels"][:, -5:]), backend)
    positions = torch.tensor([2, 5, 6, 11])
    assert_same_training(model, dict(inputs, logits_to_keep=positions, labels=inputs["labels"][:, positions]),
                         backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_and_untied_heads_and_a_head_bias(backend):
    tied = tiny("Llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert_same_training(tied, batch(), backend)
    untied = tiny("Llama", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    untied.lm_head = torch.nn.Linear(32, 97, bias=True)
    torch.nn.init.normal_(untied.lm_head.bias)
    assert_same_training(untied, batch(), backend)


def test_options_reach_linear_cross_entropy():
    model, inputs = tiny("Llama"), batch()
    plain = lf_hf.patch(model, backend="reference")(**inputs).loss
    smoothed = lf_hf.patch(model, backend="reference", label_smoothing=0.1, z_loss=1e-2)(**inputs).loss
    assert smoothed > plain
    for wrong in ("label_smoothin", "ignore_index", "reduction"):
        with pytest.raises(TypeError, match=wrong):
            lf_hf.patch(model, **{wrong: 0})
    with pytest.raises(TypeError, match="final_logit_softcapping"):
        lf_hf.patch(tiny("Gemma2"), softcap=5.0)


def test_the_models_own_forward_runs_without_labels_in_eval_or_when_logits_are_asked_for():
    model, inputs = tiny("Llama"), batch()
    expected = model(**inputs)
    lf_hf.patch(model, backend="reference")
    assert model(**inputs).logits is None
    with torch.no_grad():
        assert model(**inputs).logits is None  # training mode: the training loss
        model.eval()
        evaluated = model(**inputs)  # eval without grad: the model's own forward, logits included
        torch.testing.assert_close(evaluated.logits, expected.logits)
        torch.testing.assert_close(evaluated.loss, expected.loss)
        model.train()
    no_labels = model(input_ids=inputs["input_ids"])
    assert no_labels.loss is None and no_labels.logits is not None
    asked = model(**inputs, return_logits=True)
    torch.testing.assert_close(asked.logits, expected.logits)
    assert isinstance(model(**inputs, return_dict=False), tuple)


def test_unpatch_restores_the_exact_forward():
    model = tiny("Llama")
    assert lf_hf.patch(model) is model and "forward" in vars(model)
    assert lf_hf.unpatch(model) is model
    assert "forward" not in vars(model) and model.forward.__func__ is type(model).forward
    own = model.forward = model.forward  # an instance-level forward (as accelerate's hooks set) comes back
    lf_hf.unpatch(lf_hf.patch(model))
    assert vars(model)["forward"] is own
    with pytest.raises(ValueError, match="not patched"):
        lf_hf.unpatch(model)


def test_a_wrapper_with_get_base_model_patches_its_model():  # PEFT's PeftModel has that method
    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def get_base_model(self):
            return self.inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model = tiny("Llama")
    wrapper = Wrapper(model)
    assert lf_hf.patch(wrapper, backend="reference") is wrapper and wrapper(**batch()).logits is None
    assert lf_hf.unpatch(wrapper) is wrapper and "forward" not in vars(model)


def test_a_custom_loss_function_is_kept():
    model = tiny("Llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(TypeError, match="LlamaForCausalLM's loss_function"):
        lf_hf.patch(model)
    model = lf_hf.patch(tiny("Llama"), backend="reference")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()  # set after the patch
    out = model(**batch())
    torch.testing.assert_close(out.loss, out.logits.sum())


def test_unsupported_models_are_refused_by_class_name():
    with pytest.raises(TypeError, match="LlamaForSequenceClassification"):
        lf_hf.patch(transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SIZES)))
    if hasattr(transformers, "CohereForCausalLM"):  # scales its logits
        with pytest.raises(TypeError, match="CohereForCausalLM"):
            lf_hf.patch(transformers.CohereForCausalLM(transformers.CohereConfig(**SIZES)))
    with pytest.raises(TypeError, match="Linear"):
        lf_hf.patch(torch.nn.Linear(2, 2))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def largest_tensor_of_a_training_step(model, inputs):
    with LargestTensor() as recorder:
        model(**inputs).loss.backward()
    return recorder.largest


@pytest.mark.parametrize("patched", [True, False])
def test_no_tensor_of_n_by_v_elements(patched):
    vocab, inputs = 997, batch(vocab=997, length=40)
    model = tiny("Llama", vocab_size=vocab)
    n_by_v = inputs["input_ids"].numel() * vocab  # larger than every weight and activation of the model
    if patched:
        lf_hf.patch(model, backend="triton", chunk_size=16)
        assert largest_tensor_of_a_training_step(model, inputs) < n_by_v
    else:  # the recorder sees the model's own logits
        assert largest_tensor_of_a_training_step(model, inputs) >= n_by_v


def test_the_patched_forward_keeps_the_models_signature():
    # Callers read it: transformers' Trainer keeps only the dataset columns the forward names.
    import inspect

    model = tiny("Llama")
    before = inspect.signature(model.forward)
    lf_hf.patch(model)
    assert inspect.signature(model.forward) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_with_gradient_accumulation_matches_the_unpatched_run(backend, tmp_path):
    # A few optimiser steps of transformers' Trainer, two micro-batches per step (its loss is then a
    # sum divided by num_items_in_batch): the logged losses and the final weights of both runs agree.
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(0)
    data = []
    for ids in torch.randint(0, 97, (8, 12), generator=g):
        data.append(dict(input_ids=ids, labels=torch.where(torch.rand(12, generator=g) < 0.2, -100, ids)))

    def train(model):
        losses = []

        class Log(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[Log()]).train()
        return losses, [p.detach().clone() for p in model.parameters()]

    want_losses, want_weights = train(tiny("Llama"))
    losses, weights = train(lf_hf.patch(tiny("Llama"), backend=backend))
    assert len(losses) == len(want_losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    for w, want in zip(weights, want_weights):
        torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_of_the_patched_model(backend):
    model, inputs = tiny("Llama"), batch()
    expected, expected_grads = loss_and_grads(model, inputs)
    compiled = torch.compile(lf_hf.patch(model, backend=backend), backend="aot_eager")
    got, got_grads = loss_and_grads(compiled, inputs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name.removeprefix("_orig_mod.")] if name in got_grads
                                   else got_grads["_orig_mod." + name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_peft_lora_model(backend):
    # patch() on a PEFT model patches the causal LM inside; the LoRA factors' gradients (and the loss)
    # are the unpatched model's.
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("Llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA starts at B = 0: give its factors a gradient through A as well
                p.normal_(generator=torch.Generator().manual_seed(3))
    inputs = batch()
    expected, expected_grads = loss_and_grads(model, inputs)
    lf_hf.patch(model, backend=backend)
    got, got_grads = loss_and_grads(model, inputs)
    assert got.logits is None and any("lora_A" in name for name in got_grads)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7)
    lf_hf.unpatch(model)
    assert model(**inputs).logits is not None
