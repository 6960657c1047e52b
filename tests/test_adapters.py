"""Many adapters on one base: trained once per session on the shipped tiny base, then switched, mixed, compared."""

import json

import pytest
import torch
from helpers import TINY

from qlora_cli.data import read_jsonl
from qlora_cli.errors import QloraError
from qlora_cli.evaluate import exact_match
from qlora_cli.generate import BASE, Sampling, open_session

pytestmark = pytest.mark.pipeline
SQL = read_jsonl(TINY / "sql" / "test.jsonl")[:40]
JSON = read_jsonl(TINY / "json" / "test.jsonl")[:40]


@pytest.fixture(scope="module")
def session(trained_adapters):
    return open_session(["sql", "json"], home=str(trained_adapters))


def share(answers: list[str], prefix: str) -> float:
    return sum(answer.startswith(prefix) for answer in answers) / len(answers)


def test_each_adapter_answers_its_own_task_from_one_process(session):
    # Two epochs here (CI's budget) reach 85% (sql) and 97% (json) on these 40 questions; the demo's three
    # reach the issue's >= 90% on all 100, which test_tiny_default.py checks when asked. All from one base.
    sql_on_sql, sql_answers = exact_match(session, SQL, "sql")
    json_on_json, json_answers = exact_match(session, JSON, "json")
    base_on_sql, base_answers = exact_match(session, SQL, BASE)
    _, json_on_sql_answers = exact_match(session, SQL, "json")
    print(f"exact match: sql adapter {sql_on_sql:.2f}, json adapter {json_on_json:.2f}, base {base_on_sql:.2f}")
    assert sql_on_sql >= 0.75 and json_on_json >= 0.9 and base_on_sql <= 0.05
    assert share(sql_answers, "SELECT") == 1 and share(json_answers, "{") == 1
    assert share(base_answers, "SELECT") <= 0.1
    assert share(json_on_sql_answers, "{") >= 0.8  # the json adapter stays itself on SQL questions


def test_mix_moves_the_output_toward_the_heavier_adapter(session):
    def share_of_sql(weights: dict, name: str) -> float:
        session.add_mix(weights, name=name)
        answers = session.ask(SQL[:20], name, Sampling(max_new_tokens=24))
        return sum(answer.startswith("SELECT") for answer in answers) / len(answers)

    mostly_sql = share_of_sql({"sql": 0.9, "json": 0.1}, "mostly-sql")
    mostly_json = share_of_sql({"sql": 0.1, "json": 0.9}, "mostly-json")
    assert mostly_sql > mostly_json
    assert mostly_sql >= 0.7 and mostly_json <= 0.3


def test_an_adapter_on_a_different_base_is_refused(trained_adapters, tmp_path):
    import shutil

    moved = tmp_path / "sql"
    shutil.copytree(trained_adapters / "sql", moved)
    meta = json.loads((moved / "qlora.json").read_text())
    meta["base"]["fingerprint"] = "sha256:" + "0" * 32
    (moved / "qlora.json").write_text(json.dumps(meta))
    with pytest.raises(QloraError, match=r"adapter '.*sql' was trained on .*sha256:0000.*but the base being loaded is"):
        open_session([str(moved)])
    assert open_session([str(moved)], allow_base_mismatch=True).names == [BASE, "sql"]


def test_plain_peft_loads_the_adapter_with_no_qlora_code(trained_adapters, session):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained_adapters / "sql")
    tokenizer = AutoTokenizer.from_pretrained(trained_adapters / "sql")
    prompt = session.prompt(SQL[0], "sql")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    plain_answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert (
        plain_answer.startswith("SELECT")
        and plain_answer == session.ask([SQL[0]], "sql", Sampling(max_new_tokens=40))[0]
    )


def test_batch_mode_routes_each_row_to_its_adapter(trained_adapters, session, tmp_path, run_cli):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{**SQL[0], "adapter": "sql"}, {**JSON[0], "adapter": "json"}]
    prompts.write_text(
        "".join(json.dumps({k: row[k] for k in ("instruction", "input", "adapter")}) + "\n" for row in rows)
    )
    out = tmp_path / "answers.jsonl"
    code, _, err = run_cli(
        [
            "generate",
            "-a",
            "sql",
            "-a",
            "json",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--adapters-dir",
            str(trained_adapters),
        ],
    )
    assert code == 0, err
    answers = read_jsonl(out)
    expected = [session.ask([SQL[0]], "sql")[0], session.ask([JSON[0]], "json")[0]]
    assert [(a["adapter"], a["answer"]) for a in answers] == [("sql", expected[0]), ("json", expected[1])]
    assert expected[0].startswith("SELECT") and expected[1].startswith("{")


def test_compare_prints_base_and_adapter(trained_adapters, session, run_cli):
    code, out, err = run_cli(
        [
            "generate",
            "--compare",
            "-a",
            "sql",
            SQL[1]["instruction"],
            "--input",
            SQL[1]["input"],
            "--adapters-dir",
            str(trained_adapters),
        ],
    )
    assert code == 0, err
    assert "── none ──" in out and "── sql ──" in out and session.ask([SQL[1]], "sql")[0] in out


def table_rows(printed: str) -> dict[str, list[str]]:
    """A rich table's rows by their first cell; a wrapped row's continuation lines, which leave the cells
    that did not wrap empty, are skipped."""
    rows = {}
    for line in printed.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if line.startswith("│") and all(cells):
            rows[cells[0]] = cells
    return rows


def test_adapters_list_and_show(trained_adapters, run_cli):
    code, out, _ = run_cli(["adapters", "list", "--adapters-dir", str(trained_adapters)])
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("json ", "sql "))}
    assert rows.keys() == {"json", "sql"} and all("tiny/base" in cells for cells in rows.values())
    code, out, _ = run_cli(["adapters", "show", "sql", "--adapters-dir", str(trained_adapters)])
    assert code == 0 and '"fingerprint": "sha256:' in out and "# recipe.yaml" in out


def test_merged_model_scores_what_the_adapter_scores(trained_adapters, session, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_cli import merge

    merged_record = merge.run("sql", tmp_path / "merged", home=str(trained_adapters))
    assert merged_record.source == "nf4" and merged_record.relative_logit_diff <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers: no lock-in
    adapter_score, adapter_answers = exact_match(session, SQL, "sql")
    merged_session = type(session)(
        model=merged, tokenizer=session.tokenizer, base_id="merged", styles={"sql": session.style("sql")}
    )
    merged_score, merged_answers = exact_match(merged_session, SQL, "sql")
    assert merged_score == adapter_score
    assert sum(a == b for a, b in zip(adapter_answers, merged_answers)) >= len(SQL) - 1


def test_eval_puts_base_adapter_and_mix_in_one_table_and_json(trained_adapters, run_cli, monkeypatch, tmp_path):
    out = tmp_path / "eval.json"
    monkeypatch.chdir(TINY.parent.parent)  # the README's relative path, as a user types it
    code, printed, err = run_cli(
        [
            "eval",
            "--data",
            "recipes/tiny/sql/test.jsonl",
            "--max-rows",
            "20",
            "-a",
            "none",
            "-a",
            "sql",
            "--mix",
            "sql=0.9,json=0.1",
            "--sql",
            "--out",
            str(out),
            "--adapters-dir",
            str(trained_adapters),
        ],
    )
    assert code == 0, err
    results = {row["adapter"]: row for row in json.loads(out.read_text())["results"]}
    # The table shows what the JSON holds, row by row (the mix's label wraps at 80 columns: its first word).
    printed_rows = {label.split()[0]: cells for label, cells in table_rows(printed).items()}
    assert printed_rows.keys() == {"none", "sql", "mix"}
    for name, row in results.items():
        assert f"{row['loss']:.3f}" in printed_rows[name] and f"{100 * row['exact_match']:.1f}%" in printed_rows[name]
    assert list(results) == ["none", "sql", "mix"] and all(row["examples"] == 20 for row in results.values())
    assert (
        results["sql"]["exact_match"] > results["none"]["exact_match"]
        and results["sql"]["loss"] < results["none"]["loss"]
    )
    # Same queries can differ in text yet return the same rows, never the reverse.
    assert all(row["execution_match"] >= row["exact_match"] for row in results.values())


def test_a_mix_may_name_adapters_by_folder_path(trained_adapters):
    mixed = open_session([], mix={str(trained_adapters / "sql"): 0.9, "json": 0.1}, home=str(trained_adapters))
    assert mixed.names == [BASE, "sql", "json", "mix"]
    assert mixed.style("mix") == mixed.style("sql")  # prompted as its first member


def test_qlora_serve_answers_the_openai_client_as_the_adapters_answer_in_process(trained_adapters, session):
    """The demo's adapters behind `qlora serve`, asked by the official client from eight threads at once
    (so the server batches sql, json and base rows together): every answer is the one `qlora generate`
    gives for the same question."""
    import signal
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from helpers import QLORA, free_port, read_until

    port = free_port()
    server = subprocess.Popen(
        [*QLORA, "serve", "--adapters-dir", str(trained_adapters), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        read_until(server.stdout, "serving")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        base_id = client.models.list().data[0].id
        asks = [(name, row) for name in ("sql", "json", base_id) for row in (SQL[:4] if name != "json" else JSON[:4])]

        def served(ask) -> str:
            name, row = ask
            content = f"{row['instruction']}\n\n{row['input']}"
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": content}], max_tokens=48, temperature=0
            )
            return reply.choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(served, asks))
        expected = [
            session.ask([row], BASE if name == base_id else name, Sampling(max_new_tokens=48))[0] for name, row in asks
        ]
        assert answers == expected
        assert all(answer.startswith("SELECT") for answer in answers[:4])
        assert all(answer.startswith("{") for answer in answers[4:8])
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
