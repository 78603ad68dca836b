"""The Hugging Face Trainer with ``backend="nvfp4"``: compile the model before the Trainer; OsciReset by callback."""

import pytest
import torch

import fp4compile

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
IDS = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))


class Bytes(torch.utils.data.Dataset):
    def __len__(self):
        return len(IDS)

    def __getitem__(self, i):
        return {"input_ids": IDS[i], "labels": IDS[i]}


def _train(tmp_path, compile_options=None, osci=None, steps=4):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if compile_options is not None:
        model.compile(backend="nvfp4", options=compile_options)  # before the Trainer, which cannot name the backend
    callbacks = []
    if osci is not None:
        reset = fp4compile.OsciReset(model, compile_options["recipe"], **osci)
        callbacks.append(fp4compile.OsciResetCallback(reset))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Bytes(), callbacks=callbacks)
    trainer.train()
    torch._dynamo.reset()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, (callbacks[0].osci_reset if callbacks else None)


def test_trainer_trains_a_model_compiled_with_nvfp4(tmp_path):
    plain, _ = _train(tmp_path / "plain")
    nvfp4, _ = _train(tmp_path / "nvfp4", {"recipe": "nvidia", "inner": "aot_eager"})
    assert len(nvfp4) == len(plain) == 4 and all(torch.isfinite(torch.tensor(nvfp4)))
    assert nvfp4 != plain  # the quantized graphs ran
    assert max(abs(a - b) for a, b in zip(nvfp4, plain)) < 0.05  # and train like the unquantized model


def test_osci_reset_callback_advances_once_per_optimizer_step(tmp_path):
    osci = dict(start=0, period=2, window=1, threshold=0.5)
    _, reset = _train(tmp_path, {"recipe": "tetrajet_v2", "inner": "aot_eager"}, osci=osci, steps=5)
    assert reset.step == 5  # on_step_end: one schedule step per optimizer step
    assert [r["step"] for r in reset.history] == [2, 4]  # snapshot 0, track 1, reset after step 2; again at 4
    with pytest.raises(TypeError, match="expects an fp4compile.OsciReset"):
        fp4compile.OsciResetCallback("tetrajet_v2")


def test_training_arguments_cannot_name_the_backend_which_is_why_the_model_is_compiled_first(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, torch_compile=True, torch_compile_backend="nvfp4", report_to=[]
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with pytest.raises(ValueError, match="is not a valid DynamoBackend"):  # accelerate's fixed list of backends
        transformers.Trainer(model=model, args=args)
