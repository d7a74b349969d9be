"""fastcaps train: augmentation, data order, resume, DistributedDataParallel, the command line.

The models here are the paper's CapsNet at 28x28 with few channels (8 conv, 2 primary
capsule channels: 72 input capsules), so that a few epochs take seconds.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fastcaps.tools import cli
from fastcaps.tools import train as T
from fastcaps.tools.train import loop
from fastcaps.tools.train.data import load_sklearn_digits
from fastcaps.nn import CapsuleLoss

TINY = dict(limit=96, batch_size=16, conv_channels=8, primary_channels=2, progress=False)


def _torchrun(processes, *arguments, cwd):
    # --standalone: a rendezvous on a free local port, so parallel runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *arguments]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_shift_images_moves_and_zero_fills():
    images = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    shifted = T.shift_images(images, torch.tensor([[1, 0], [0, -2]]))
    torch.testing.assert_close(shifted[0, 0, 1:], images[0, 0, :3])  # down by one row
    assert float(shifted[0, 0, 0].abs().sum()) == 0
    torch.testing.assert_close(shifted[1, 0, :, :2], images[1, 0, :, 2:])  # left by two columns
    assert float(shifted[1, 0, :, 2:].abs().sum()) == 0
    assert torch.equal(T.shift_images(images, torch.zeros(2, 2, dtype=torch.long)), images)


def test_epoch_order_depends_only_on_seed_and_epoch():
    first, generator = T.epoch_batches(50, 8, seed=3, epoch=1)
    torch.rand(5)  # the global RNG plays no part
    again, generator_again = T.epoch_batches(50, 8, seed=3, epoch=1)
    assert len(first) == 6 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=generator_again))
    assert sorted(torch.cat(first).tolist()) == sorted(set(torch.cat(first).tolist()))  # no repeats
    other, _ = T.epoch_batches(50, 8, seed=3, epoch=2)
    assert not torch.equal(torch.cat(first), torch.cat(other))


def test_process_slices_cover_the_batch_in_order():
    batch = torch.arange(12)
    parts = [T.process_slice(batch, T.Processes(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batch)


def _without_seconds(history):
    return [{key: value for key, value in entry.items() if key != "seconds"} for entry in history]


def test_resume_continues_to_the_same_numbers(tmp_path):
    uninterrupted = T.train(T.TrainConfig(epochs=2, out=str(tmp_path / "full"), **TINY))
    T.train(T.TrainConfig(epochs=1, out=str(tmp_path / "part"), **TINY))
    checkpoint = str(tmp_path / "part" / "checkpoint.pt")
    resumed = T.train(T.TrainConfig(epochs=2, out=str(tmp_path / "part"), resume=checkpoint, **TINY))
    assert _without_seconds(resumed) == _without_seconds(uninterrupted)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert full["epoch"] == part["epoch"] == 2
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert full["schedule"] == part["schedule"]
    for key, state in full["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, part["optimizer"]["state"][key][field]), (key, field)


def test_resume_refuses_other_settings(tmp_path):
    T.train(T.TrainConfig(epochs=1, out=str(tmp_path), **TINY))
    changed = {**TINY, "conv_channels": 4}
    with pytest.raises(ValueError, match="was trained with other settings.*conv_channels: checkpoint 8, now 4"):
        T.train(T.TrainConfig(epochs=2, out=str(tmp_path), resume=str(tmp_path / "checkpoint.pt"), **changed))


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be an int >= 1"),
    ("batch_size", 2.5, "batch_size must be an int >= 1"),
    ("lr", 0.0, "lr must be > 0"),
    ("lr_decay", 1.5, r"lr_decay must be in \(0, 1\]"),
    ("max_shift", -1, "max_shift must be >= 0"),
    ("model", "emm", "model must be one of capsnet, conv, em"),
    ("em_sizes", (8, 4, 4), r"em_sizes must be four ints >= 1"),
    ("camera", "top", "camera must be left, right or both"),
])
def test_config_errors_name_the_setting(field, value, message):
    with pytest.raises(ValueError, match=message):
        T.TrainConfig(**{field: value})


def test_the_conv_model_trains_and_its_checkpoint_has_a_convcaps_layer(tmp_path):
    history = T.train(T.TrainConfig(epochs=1, out=str(tmp_path), model="conv", **TINY))
    assert len(history) == 1 and history[0]["train_loss"] > 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert state["conv_caps.weight"].shape == (16, 2, 3, 3, 12, 8)


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size 128 is larger than the 96 training samples"):
        T.train(T.TrainConfig(epochs=1, out=str(tmp_path), **{**TINY, "batch_size": 128}))


def test_command_line_writes_checkpoint_history_and_pictures(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--limit", "64", "--batch-size", "16", "--conv-channels", "8",
                     "--primary-channels", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2: train loss" in printed and "test accuracy" in printed
    history = json.loads((out / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert all(0 <= entry["test_accuracy"] <= 1 and entry["train_loss"] > 0 for entry in history)
    for picture in ("reconstructions.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_names_a_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        cli.main(["train", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path)])


_DDP_GRADIENTS = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from fastcaps.nn import CapsuleLoss
    from fastcaps.tools import train as T
    from fastcaps.tools.train import distributed, loop

    config = T.TrainConfig(conv_channels=8, primary_channels=2)
    processes = distributed.start_processes(torch.device("cpu"))
    model = loop.build_model(config, torch.device("cpu"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = torch.load(sys.argv[1])
    images = T.process_slice(batch["images"], processes)
    labels = T.process_slice(batch["labels"], processes)
    CapsuleLoss()(ddp(images, labels), images, labels).backward()
    torch.save(images, f"images-{processes.rank}.pt")
    if processes.main:
        torch.save({name: p.grad for name, p in model.named_parameters()}, sys.argv[2])
    dist.destroy_process_group()
""")


def test_ddp_gradients_equal_one_process_on_the_combined_batch(tmp_path):
    train, _ = load_sklearn_digits()
    batch = {"images": train.images[:12], "labels": train.labels[:12]}
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "ddp_gradients.py").write_text(_DDP_GRADIENTS)
    _torchrun(2, "ddp_gradients.py", "batch.pt", "gradients.pt", cwd=tmp_path)
    averaged = torch.load(tmp_path / "gradients.pt")
    # Each process saw its own half, so the equality below is DDP's averaging at work.
    halves = [torch.load(tmp_path / f"images-{rank}.pt") for rank in range(2)]
    assert torch.equal(torch.cat(halves), batch["images"]) and len(halves[0]) == 6

    config = T.TrainConfig(conv_channels=8, primary_channels=2)
    model = loop.build_model(config, torch.device("cpu"))
    CapsuleLoss()(model(batch["images"], batch["labels"]), batch["images"], batch["labels"]).backward()
    for name, parameter in model.named_parameters():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(averaged[name], parameter.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_torchrun_trains_as_one_process_does(tmp_path):
    arguments = ["--epochs", "1", "--limit", "64", "--batch-size", "16", "--conv-channels", "8",
                 "--primary-channels", "2", "--no-progress"]
    result = _torchrun(2, "-m", "fastcaps", "train", *arguments, "--out", "two", cwd=tmp_path)
    assert "2 process(es)" in result.stdout
    cli.main(["train", *arguments, "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "history.json").read_text())[0]
    one = json.loads((tmp_path / "one" / "history.json").read_text())[0]
    for key in ("train_loss", "test_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["train_accuracy"] == one["train_accuracy"] and two["test_accuracy"] == one["test_accuracy"]


EM_TINY = dict(limit=64, batch_size=16, model="em", em_sizes=(8, 2, 2, 2), progress=False)


def test_the_em_model_trains_resumes_and_steps_the_spread_margin(tmp_path):
    uninterrupted = T.train(T.TrainConfig(epochs=2, out=str(tmp_path / "full"), **EM_TINY))
    T.train(T.TrainConfig(epochs=1, out=str(tmp_path / "part"), **EM_TINY))
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert int(state["loss"]["steps_taken"]) == 1 and "class_caps.beta_a" in state["model"]
    resumed = T.train(T.TrainConfig(epochs=2, out=str(tmp_path / "part"), resume=str(tmp_path / "part" / "checkpoint.pt"),
                                    **EM_TINY))
    assert _without_seconds(resumed) == _without_seconds(uninterrupted)
    assert not (tmp_path / "full" / "reconstructions.png").exists() and (tmp_path / "full" / "curves.png").exists()
    em = T.TrainConfig(model="em")
    assert (em.iterations, em.epochs, em.lr, em.lr_decay, em.lr_decay_steps) == (2, 40, 3e-3, 0.9, 100)
    assert (T.TrainConfig().iterations, T.TrainConfig(iterations=1).iterations, T.TrainConfig().lr) == (3, 1, 1e-3)


def test_the_em_model_trains_on_smallnorb_files(tmp_path, monkeypatch):
    from test_data import write_smallnorb
    from fastcaps.tools.train import smallnorb
    write_smallnorb(tmp_path / "norb", 40)
    monkeypatch.setattr(smallnorb, "SPLIT_SIZE", 40)
    history = T.train(T.TrainConfig(epochs=1, out=str(tmp_path / "out"), data_dir=str(tmp_path / "norb"),
                                    camera="both", limit=None, batch_size=16, model="em", em_sizes=(4, 2, 2, 2),
                                    progress=False))
    assert len(history) == 1 and 0 <= history[0]["test_accuracy"] <= 1
    with pytest.raises(ValueError, match="holds smallNORB, which --model em trains"):
        T.train(T.TrainConfig(epochs=1, out=str(tmp_path / "out"), data_dir=str(tmp_path / "norb"), **TINY))
