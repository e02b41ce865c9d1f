"""compare.py: junit outcomes, regressions, the allow-list, the exit status."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # noqa: E402

# The shapes pytest 9 writes (see the peer runs): a failed subtest is a <failure> of its
# test, an xfail a <skipped type="pytest.xfail">, a non-strict xpass a bare testcase.
UNPATCHED = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.m.T" name="test_ok" time="0.1"><properties>
  <property name="vgpatch_calls" value="0"/></properties></testcase>
<testcase classname="tests.m.T" name="test_breaks" time="0.1"/>
<testcase classname="tests.m.T" name="test_subtest" time="0.1"/>
<testcase classname="tests.m.T" name="test_attn_implementation_composite_models" time="0.1"/>
<testcase classname="tests.m.T" name="test_vanishes" time="0.1"/>
<testcase classname="tests.m.T" name="test_skip" time="0"><skipped type="pytest.skip" message="no gpu"/></testcase>
<testcase classname="tests.m.T" name="test_xfail" time="0"><skipped type="pytest.xfail" message=""/></testcase>
<testcase classname="tests.m.T" name="test_was_red" time="0"><failure message="boom">x</failure></testcase>
<testcase classname="tests.m.T" name="test_xpass" time="0"/>
</testsuite></testsuites>"""

PATCHED = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.m.T" name="test_ok" time="0.1"><properties>
  <property name="vgpatch_calls" value="4"/></properties></testcase>
<testcase classname="tests.m.T" name="test_breaks" time="0.1"><failure message="ValueError: layer 0 got 24 keys">tb</failure></testcase>
<testcase classname="tests.m.T" name="test_subtest" time="0.1"><failure message="AssertionError: 1 == 1">tb</failure>
  <failure message="contains 1 failed subtest">contains 1 failed subtest</failure></testcase>
<testcase classname="tests.m.T" name="test_attn_implementation_composite_models" time="0.1"><failure message="ValueError: eager">tb</failure></testcase>
<testcase classname="tests.m.T" name="test_skip" time="0"><skipped type="pytest.skip" message="no gpu"/></testcase>
<testcase classname="tests.m.T" name="test_xfail" time="0"><skipped type="pytest.xfail" message=""/></testcase>
<testcase classname="tests.m.T" name="test_was_red" time="0"/>
<testcase classname="tests.m.T" name="test_xpass" time="0"/>
<testcase classname="tests.m.T" name="test_teardown" time="0"/>
<testcase classname="tests.m.T" name="test_teardown" time="0"><error message="vgpatch: patch_model failed">tb</error></testcase>
</testsuite></testsuites>"""


@pytest.fixture
def reports(tmp_path):
    u, p = tmp_path / "u.xml", tmp_path / "p.xml"
    u.write_text(UNPATCHED)
    p.write_text(PATCHED)
    return str(u), str(p)


def test_outcomes_from_junit(reports):
    u = compare.load_junit(reports[0])
    p = compare.load_junit(reports[1])
    assert u["tests.m.T::test_skip"].outcome == "skipped"
    assert u["tests.m.T::test_xfail"].outcome == "xfailed"
    assert u["tests.m.T::test_was_red"].outcome == "failed"
    assert u["tests.m.T::test_xpass"].outcome == "passed"
    assert p["tests.m.T::test_subtest"].outcome == "failed"
    assert p["tests.m.T::test_breaks"].message == "ValueError: layer 0 got 24 keys"
    # Reported twice (pass, then an error at teardown): the worst outcome wins.
    assert p["tests.m.T::test_teardown"].outcome == "error"
    assert p["tests.m.T::test_ok"].props == {"vgpatch_calls": "4"}


def test_regressions_allowed_and_fixed(reports):
    c = compare.compare(compare.load_junit(reports[0]), compare.load_junit(reports[1]),
                        allow=["test_attn_implementation_composite_models"])
    assert [(t.rsplit("::", 1)[1], p.outcome) for t, _, p in c.regressions] == [
        ("test_breaks", "failed"), ("test_subtest", "failed"), ("test_vanishes", "missing")]
    assert [t.rsplit("::", 1)[1] for t, _, _ in c.allowed] == ["test_attn_implementation_composite_models"]
    assert [t.rsplit("::", 1)[1] for t in c.fixed] == ["test_was_red"]
    assert c.passed_both == 2 and c.vgkernels_ran == 1  # test_ok ran vgkernels, test_xpass did not
    assert not c.ok
    assert c.counts["unpatched"]["passed"] == 6 and c.counts["patched"]["error"] == 1


def test_without_the_allow_list_the_composite_test_is_a_regression(reports):
    c = compare.compare(compare.load_junit(reports[0]), compare.load_junit(reports[1]))
    assert "tests.m.T::test_attn_implementation_composite_models" in [t for t, _, _ in c.regressions]


def test_cli_exit_status_and_report(reports, tmp_path, capsys):
    assert compare.main([*reports, "--allow", "test_attn_*", "--label", "x"]) == 1
    out = capsys.readouterr().out
    assert "[x] REGRESSIONS: 3 tests passed unpatched but not patched:" in out
    assert "T::test_breaks: failed: ValueError: layer 0 got 24 keys" in out
    assert "ALLOWED difference: T::test_attn_implementation_composite_models" in out
    assert compare.main([reports[0], reports[0]]) == 0
    assert "no regressions" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read junit XML"):
        compare.main([reports[0], str(tmp_path / "missing.xml")])
