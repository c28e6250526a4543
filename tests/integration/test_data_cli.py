"""The data a user brings, end to end through `leantune train`: sharegpt and alpaca files with
renamed columns, packed; a family whose code cannot keep packed samples apart trains unpacked."""

from __future__ import annotations

import json

from leantune.cli import main
from tests.families import save_family
from tests.helpers import stop_at

TINY = [
    "model.preset=test",
    "train.batch_size=4",
    "train.max_steps=6",
    "optim.warmup_steps=1",
    "eval.every=0",
    "data.num_eval=4",
    "data.max_length=96",
    "log.every=1",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=false",
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(run_root):
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_sharegpt_packed_and_alpaca_with_renamed_columns_train(tmp_path, capsys):
    words = ("abc", "hello", "packing", "leantune", "xyz", "data") * 8
    chats = [{"conversations": [{"from": "human", "value": f"reverse {w}"},
                                {"from": "gpt", "value": w[::-1]}]} for w in words]  # fmt: skip
    path = write(tmp_path / "chats.jsonl", chats)
    code = main(["train", *TINY, f"data.train={path}", "data.pack=true", f"train.output_dir={tmp_path}/a"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "data (sharegpt): train 44 records -> 44 sequences" in out
    assert "44 samples packed into" in out and "attention kept inside each sample" in out
    got = losses(tmp_path / "a")
    assert len(got) == 6 and got[-1] < got[0]

    rows = [{"task_text": f"sort {d}", "solution": "".join(sorted(d))} for d in ("3142", "987", "5501") * 10]
    path = write(tmp_path / "alpaca.jsonl", rows)
    columns = "data.columns={instruction: task_text, output: solution}"
    code = main(["train", *TINY, f"data.train={path}", columns, f"train.output_dir={tmp_path}/b"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "data (alpaca): train 27 records -> 27 sequences" in out and "packed into" not in out


def test_a_family_that_sees_across_packed_samples_trains_unpacked(tmp_path, capsys):
    model = save_family("opt", tmp_path / "opt")
    path = write(tmp_path / "d.jsonl", [{"prompt": f"{i} + 1 = ", "response": str(i + 1)} for i in range(40)])
    argv = [*TINY[1:], f"model.path={model}", f"data.train={path}", "data.pack=true",
            f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=2"]  # fmt: skip
    assert main(["train", *argv]) == 0
    out = capsys.readouterr().out
    refused = "data: not packed (OPTForCausalLM does not keep packed samples apart); one sample per sequence"
    assert refused in out


def test_a_weighted_mixture_resumes_mid_run_bitwise_and_reports_what_it_drew(tmp_path, capsys):

    import torch
    from safetensors.torch import load_file

    from leantune.config import load_config
    from leantune.trainer import Trainer

    a = write(
        tmp_path / "a.jsonl", [{"prompt": f"reverse {w}\n", "response": w[::-1]} for w in ("abc", "xyz") * 20]
    )
    b = write(
        tmp_path / "b.jsonl",
        [{"text": f"the number {i} is {'even' if i % 2 == 0 else 'odd'}"} for i in range(60)],
    )
    common = [*TINY, f"data.train=[{a}, {b}]", "data.weights=[0.25, 0.75]", "data.pack=false",
              f"train.output_dir={tmp_path}/runs", "train.max_steps=8"]  # fmt: skip
    full = Trainer(load_config(None, [*common, "train.run_name=full"])).run()
    out = capsys.readouterr().out
    assert f"data: mixing {a}: 38 samples, weight 0.25, {b}: 58 samples, weight 0.75" in out
    assert "data mixture over 32 samples: " in out
    part = Trainer(load_config(None, [*common, "train.run_name=part"]), hooks=[stop_at(4)]).run()
    assert part.interrupted and part.steps == 4
    done = Trainer(load_config(None, [*common, "train.run_name=part", "train.resume=auto"])).run()
    x, y = (
        load_file(str(full.final_dir / "model.safetensors")),
        load_file(str(done.final_dir / "model.safetensors")),
    )
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert done.metrics["data_mixture"] == full.metrics["data_mixture"]


def test_a_streamed_run_resumes_mid_stream_bitwise(tmp_path, capsys):

    import torch
    from safetensors.torch import load_file

    from leantune.config import load_config
    from leantune.trainer import Trainer

    rows = [
        {"prompt": f"reverse {w}{i}\n", "response": f"{i}{w[::-1]}"}
        for i, w in enumerate(["abc", "xyz"] * 30)
    ]
    path = write(tmp_path / "s.jsonl", rows)
    common = [*TINY, f"data.train={path}", "data.streaming=true", "data.shuffle_buffer=6",
              f"train.output_dir={tmp_path}/runs", "train.max_steps=9"]  # fmt: skip
    full = Trainer(load_config(None, [*common, "train.run_name=full"])).run()
    assert f"data (instruction): streaming {path} (~56 records, shuffle buffer 6)" in capsys.readouterr().out
    part = Trainer(load_config(None, [*common, "train.run_name=part"]), hooks=[stop_at(5)]).run()
    assert part.interrupted and part.steps == 5
    done = Trainer(load_config(None, [*common, "train.run_name=part", "train.resume=auto"])).run()
    x, y = (
        load_file(str(full.final_dir / "model.safetensors")),
        load_file(str(done.final_dir / "model.safetensors")),
    )
    assert all(torch.equal(x[k], y[k]) for k in x)
