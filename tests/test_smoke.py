"""The spine end to end: `import aim_llama.auto` + AIM_REPO → a finished run with prompts and responses."""

import pytest

from conftest import APPS, only_run


@pytest.mark.new_repo
def test_auto_import_records_prompts_and_responses(run_py, repo):
    proc = run_py(script=APPS / "rag.py", args=["3"], env={"AIM_EXPERIMENT": "smoke"})
    assert "DONE" in proc.stdout
    assert proc.stderr.strip() == ""  # a clean exit: no warnings, no tracebacks from Aim's exit hooks
    run = only_run(repo)
    assert run.experiment == "smoke"
    assert run.end_time is not None and not run.active
    prompts = run.text("prompt", kind="llm")
    responses = run.text("response", kind="llm")
    assert [s for s, _ in prompts] == [0, 1, 2]
    assert [s for s, _ in responses] == [0, 1, 2]
    assert "question 1: what about topic 1?" in prompts[1][1]
    assert all(text.strip() for _, text in responses)
