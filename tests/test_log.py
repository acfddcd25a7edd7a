"""The `aim_llama` logger's fallback line, for applications that configured no logging."""

from __future__ import annotations


def test_without_app_logging_each_line_reaches_stderr_once_errors_marked(run_py):
    """An app with no logging set up still sees aim-llama's lines: `aim_llama: ` before a
    warning, `aim_llama: error: ` before an error (data lost); the same key said only once;
    INFO stays quiet, as Python's own default is."""
    proc = run_py("import logging\n"
                  "from aim_llama.log import warn_once\n"
                  "warn_once('a', 'records lost: %d', 3, level=logging.ERROR)\n"
                  "warn_once('a', 'records lost: %d', 4, level=logging.ERROR)\n"
                  "warn_once('b', 'queue full')\n"
                  "warn_once('c', 'just so you know', level=logging.INFO)\n"
                  "print('DONE')\n", use_repo=False)
    assert proc.stdout == "DONE\n"
    assert proc.stderr.splitlines() == ["aim_llama: error: records lost: 3",
                                        "aim_llama: queue full"]
