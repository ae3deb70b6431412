"""`adl predict` end to end through the real typer app on tiny BERT runs."""

import json

import pytest
from tiny_backbones import bert_folder, write_conll, write_csv
from typer.testing import CliRunner

from adl.cli import app
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from adl.train.config import TrainConfig
from adl.train.run import run_train

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-cli")
    bert = bert_folder(root / "bert")
    out = {}
    for name, data in (("sentiment", f"csv:{write_csv(root / 'd.csv')}"), ("ner", f"conll:{write_conll(root / 'd.conll')}")):
        run_extract(ExtractConfig(model=str(bert), dataset=data, out=str(root / f"c-{name}"), batch_size=8,
                                  progress=False))
        run_train(TrainConfig(cache=str(root / f"c-{name}"), out=str(root / name), head="adalayers", k=8, heads=2,
                              ff=16, lr=0.01, alpha=10.0, max_epochs=2, device="cpu"))
        out[name] = root / name
    return out


def invoke(*args):
    return runner.invoke(app, ["predict", *[str(a) for a in args]])


def test_split_reproduces_the_runs_test_metrics(runs, tmp_path):
    out = tmp_path / "preds.jsonl"
    res = invoke("--run", runs["sentiment"], "--split", "test", "--out", out)
    assert res.exit_code == 0, res.output
    reported = json.loads((runs["sentiment"] / "metrics.json").read_text())["test"]
    written = json.loads((tmp_path / "preds.metrics.json").read_text())["sentiment"]
    assert set(written) == set(reported) and abs(written["accuracy"] - reported["accuracy"]) <= 1e-4
    assert f"{reported['accuracy']:.4f}" in res.output and "inputs/s" in res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and list(rows[0]) == ["id", "text", "sentiment"] and "label" in rows[0]["sentiment"]


def test_two_heads_in_one_pass_on_texts_and_files(runs, tmp_path):
    res = invoke("--run", runs["sentiment"], "--run", runs["ner"], "--text", "john sat in london", "--text", " ",
                 "--out", tmp_path / "t.jsonl")
    assert res.exit_code == 0, res.output
    assert "skipped 1 empty input" in res.output
    (row,) = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert set(row) == {"id", "text", "sentiment", "ner"} and "entities" in row["ner"]
    txt = tmp_path / "in.txt"
    txt.write_text("good movie\n\nbad plot\n")
    res = invoke("--run", runs["sentiment"], "--file", txt, "--out", tmp_path / "f.jsonl")
    assert res.exit_code == 0 and "skipped 1 empty input" in res.output
    assert [json.loads(x)["id"] for x in (tmp_path / "f.jsonl").read_text().splitlines()] == [0, 2]
    csv = tmp_path / "in.csv"
    csv.write_text("body,other\ngood movie,1\n")
    res = invoke("--run", runs["sentiment"], "--file", csv, "--text-column", "body", "--out", tmp_path / "c.jsonl")
    assert res.exit_code == 0, res.output
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good movie", None, "bad plot"]}), tmp_path / "in.parquet")
    res = invoke("--run", runs["sentiment"], "--file", tmp_path / "in.parquet", "--out", tmp_path / "p.jsonl")
    assert res.exit_code == 0 and "skipped 1 empty input" in res.output, res.output
    assert [json.loads(x)["id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [0, 2]


def test_a_files_label_column_is_scored_per_head(runs, tmp_path):
    data = write_csv(tmp_path / "labelled.csv", n=20, seed=3)  # columns text,label with the run's label names
    out = tmp_path / "l.jsonl"
    res = invoke("--run", runs["sentiment"], "--run", runs["ner"], "--file", data, "--out", out)
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "l.metrics.json").read_text())
    assert list(written) == ["sentiment"] and set(written["sentiment"]) >= {"accuracy", "mcc", "macro_f1"}
    assert "not scored: ner" in res.output
    preds = [json.loads(line)["sentiment"]["label"] for line in out.read_text().splitlines()]
    truth = [line.rsplit(",", 1)[1] for line in data.read_text().splitlines()[1:]]
    assert written["sentiment"]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(preds, truth)) / len(truth))
    other = tmp_path / "other.csv"
    other.write_text("body,y\ngood movie,pos\nbad plot,\n")  # a named column; a missing label is not scored
    res = invoke("--run", runs["sentiment"], "--file", other, "--text-column", "body", "--label-column", "y",
                 "--out", tmp_path / "o.jsonl")
    assert res.exit_code == 0, res.output
    per_class = json.loads((tmp_path / "o.metrics.json").read_text())["sentiment"]["per_class"]
    assert sum(c["support"] for c in per_class.values()) == 1


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d.joinpath("bad.txt").write_bytes(b"caf\xe9\n"), ("--file", "{d}/bad.txt"), "not UTF-8"),
    (lambda d: d.joinpath("x.csv").write_text("a,b\n1,2\n"), ("--file", "{d}/x.csv", "--text-column", "text"),
     "column 'text' not found"),
    (lambda d: d.joinpath("x.csv").write_text("text,b\n1,2\n"), ("--file", "{d}/x.csv", "--label-column", "y"),
     "label column 'y' not found"),
    (lambda d: d.joinpath("x.csv").write_text("text,b\n1,2,3\n"), ("--file", "{d}/x.csv"), "x.csv:2: expected 2 fields"),
    (lambda d: d.joinpath("x.parquet").write_bytes(b"not parquet"), ("--file", "{d}/x.parquet"), "could not read parquet"),
    (lambda d: d.joinpath("x.tsv").write_text("a\tb\n"), ("--file", "{d}/x.tsv"), "unknown file type '.tsv'"),
    (lambda d: None, ("--text", "a", "--split", "test"), "exactly one input"),
    (lambda d: d.joinpath("empty-run").mkdir(), ("--text", "a"), "incomplete"),
])
def test_bad_input_is_one_line_exit_2(runs, tmp_path, make, args, message):
    make(tmp_path)
    run = tmp_path / "empty-run" if message == "incomplete" else runs["sentiment"]
    res = invoke("--run", run, *[a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 2  # one line (rich may wrap it)


def test_few_texts_print_a_table_and_write_no_file_unasked(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("--run", runs["sentiment"], "--run", runs["ner"], "--text", "john sat in london")
    assert res.exit_code == 0, res.output
    assert list(tmp_path.iterdir()) == []  # nothing dropped into the current folder
    table = res.stdout
    assert "predictions" in table and "john sat in london" in table and "sentiment" in table and "ner" in table
    cells = [c.strip() for c in next(line for line in table.splitlines() if "john sat in london" in line).split("│")]
    (row,) = [json.loads(line) for line in invoke("--run", runs["sentiment"], "--run", runs["ner"], "--text",
                                                  "john sat in london", "--out", "-").stdout.splitlines()]
    label = row["sentiment"]["label"]
    assert cells[2] == f"{label} {row['sentiment']['probs'][label]:.2f}"  # text | sentiment | ner
    spans = [f"{e['text']} {e['type']} [{e['start']}:{e['end']}]" for e in row["ner"]["entities"]]
    assert cells[3] == ("; ".join(spans) or "(none)")


def test_out_dash_writes_jsonl_to_stdout_alone(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("--run", runs["sentiment"], "--text", "good movie", "--text", "bad plot", "--out", "-")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["good movie", "bad plot"] and all("label" in r["sentiment"] for r in rows)
    assert list(tmp_path.iterdir()) == [] and "JSONL on stdout" in res.stderr


def test_many_inputs_print_no_table_but_say_how_to_keep_them(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "many.txt").write_text("".join(f"text number {i}\n" for i in range(25)))
    res = invoke("--run", runs["sentiment"], "--file", "many.txt")
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and "pass --out FILE.jsonl (or --out - for stdout)" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["many.txt"]


def test_split_of_a_changed_data_set_is_one_line_exit_2(tmp_path):
    """--split re-reads the run's data set: an edited file (same rows, one text changed) is refused."""
    data = write_csv(tmp_path / "d.csv", n=40, seed=5)
    run_extract(ExtractConfig(model=str(bert_folder(tmp_path / "bert")), dataset=f"csv:{data}",
                              out=str(tmp_path / "c"), batch_size=8, progress=False))
    run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "r"), head="adalayers-pooled", max_epochs=1,
                          device="cpu"))
    assert invoke("--run", tmp_path / "r", "--split", "test", "--out", tmp_path / "ok.jsonl").exit_code == 0
    lines = data.read_text().splitlines()
    text, label = lines[1].rsplit(",", 1)
    data.write_text("\n".join([lines[0], f"{text} again,{label}", *lines[2:]]) + "\n")
    res = invoke("--run", tmp_path / "r", "--split", "test", "--out", tmp_path / "changed.jsonl")
    assert res.exit_code == 2, res.output
    assert f"the data set of run {tmp_path / 'r'} ({data}) changed since extraction" in res.output.replace("\n", "")
    assert len(res.output.strip().splitlines()) <= 2 and not (tmp_path / "changed.jsonl").exists()
    res = invoke("--run", tmp_path / "r", "--split", "test", "--dataset", f"csv:{data}", "--out", tmp_path / "as-is.jsonl")
    assert res.exit_code == 0, res.output  # predicting on the data set as it is now is asked for by name
