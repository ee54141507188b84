"""The entry point leaves Feast's classes uninstrumented by typeguard, everything else as it was."""

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys
    import pipeline.cli  # importing the package and its entry point changes nothing
    if sys.argv[1] == "main":
        try:
            pipeline.cli.main(["--help"])  # what `python -m pipeline ...` runs first
        except SystemExit:
            pass
    import feast
    import typeguard

    import checked_elsewhere

    code = feast.FeatureView.__init__.__code__
    try:
        checked_elsewhere.double("2")
        elsewhere = "unchecked"
    except typeguard.TypeCheckError:
        elsewhere = "checked"
    print(json.dumps({"feast": "typeguard" in code.co_names, "elsewhere": elsewhere}))
""")


def probe(tmp_path, first: str) -> dict:
    # typeguard instruments from source: the decorated function lives in a module file
    (tmp_path / "checked_elsewhere.py").write_text(
        "from typeguard import typechecked\n\n@typechecked\ndef double(x: int) -> int:\n    return 2 * x\n")
    (tmp_path / "probe.py").write_text(PROBE)
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), first], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_command_line_leaves_feast_uninstrumented_and_nothing_else(tmp_path):
    assert probe(tmp_path, "main") == {"feast": False, "elsewhere": "checked"}
    # without the entry point, Feast's constructors are instrumented (what the skip saves)
    assert probe(tmp_path, "import") == {"feast": True, "elsewhere": "checked"}
