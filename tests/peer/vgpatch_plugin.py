"""pytest plugin: run a test suite with ``vgkernels.patch_model(model, capture="all")`` on
every transformers model the tests build, and count what vgkernels did.

Loading it switches it on: put ``tests/peer`` on ``PYTHONPATH`` and pass
``-p vgpatch_plugin`` (the Makefile's ``test-peer`` does, for transformers' own LLaVA and
Qwen2-VL model tests). Options: ``--vgpatch-backend`` (the ``backend=`` given to
``patch_model``, default ``auto``: the torch reference on a CPU), ``--vgpatch-json PATH``
(the session's counts, for ``tests/peer/run.py``).

How model instances are hooked
------------------------------
Every transformers model ends its ``__init__`` with ``PreTrainedModel.post_init`` (4.57,
5.x), whichever way a test builds it: ``Model(config)``, ``from_config``,
``from_pretrained``. The plugin wraps ``post_init``: once the original has run, the new
instance is offered to ``patch_model(instance, capture="all")``.

- A composite model's parts are built, and post-initialised, before the whole (a LLaVA's
  vision tower, its language model, its ``LlavaModel``, then the
  ``LlavaForConditionalGeneration``). When an instance is finished, every instance
  recorded before it that is one of its submodules is *absorbed*: unpatched if it had
  been patched, and no longer counted. So the patch sits on the outermost model a test
  built, as a user would apply it.
- ``patch_model`` refusing an instance with ``ValueError`` (SPEC: an unsupported model,
  e.g. a bare text model or a vision tower a test builds on its own) leaves it alone; such
  instances are counted by class. Any other exception is a defect of the patch: the
  instance is left alone and, if it is not absorbed, its test errors at teardown with the
  exception, so it shows in the junit results.
- ``copy.deepcopy`` of a model (``test_eager_matches_sdpa_inference`` copies its sdpa
  model into an eager one) is a new model the test built: ``PreTrainedModel`` gets a
  ``__deepcopy__`` that unpatches the source while it is copied, patches it again, and
  offers the copy to ``patch_model`` on its own. (A deep copy of a patched model is not
  usable today: its layers keep the source's handle; reported, not papered over in the
  library.) A second ``post_init()`` on a finished model builds nothing new.
- At the end of each test (after the test's own teardown) every handle made during the
  test is unpatched and dropped, so no patch and no model outlives its test. Instances
  built outside any test (at import or collection) are unpatched when the session ends.

What is counted
---------------
- per test and in total: outermost instances patched, refused (by class) and failed;
- calls into the vgkernels kernels, counted where every public entry point dispatches:
  ``vgkernels._dispatch.get(backend, device, op)`` hands out a backend module whose
  function ``op`` is then called; the plugin wraps that function (once per module and
  op), so every call is counted by op (``attention``, ``capture_from_lse``, any op a
  rewrite adds; ``grounding_metrics`` is not attention and is not counted). A *capture*
  is an ``attention`` call that returned probabilities or a call of an op named
  ``*capture*``;
- handles that produced ``maps`` before they were unpatched.

Each test's counts go into its junit ``<properties>`` (``vgpatch_patched``,
``vgpatch_refused``, ``vgpatch_errors``, ``vgpatch_calls``, ``vgpatch_captures``), so
``compare.py`` can tell a test that passed with vgkernels running from one that passed
without it. The totals are printed at the end, and the session FAILS when no instance
was patched, no kernel call ran through vgkernels, or nothing was captured.
"""
from __future__ import annotations

import collections
import copy
import functools
import weakref

import pytest

PROP_PREFIX = "vgpatch_"
NOT_ATTENTION = ("grounding_metrics",)  # dispatched ops that are not a layer's attention
_DELETE = object()  # marks an attribute the plugin added (removed again on uninstall)


class _Record:
    __slots__ = ("model", "cls", "status", "handle", "reason", "error", "absorbed")

    def __init__(self, model, status, handle=None, reason="", error=None):
        self.model = weakref.ref(model)
        self.cls = type(model).__name__
        self.status = status  # "patched" | "refused" | "error"
        self.handle = handle
        self.reason = reason
        self.error = error
        self.absorbed = False


class _Counters:
    FIELDS = ("patched", "refused", "errors", "absorbed", "with_maps", "calls", "captures")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def snapshot(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


class VGPatch:
    """The plugin's state: the hooks it installed, the counts, the current test's records."""

    def __init__(self, backend: str):
        self.backend = backend
        self.total = _Counters()
        self.records: list[_Record] = []  # the current test's (or the session's, outside tests)
        self.session_records: list[_Record] = []
        self.refused_classes: collections.Counter = collections.Counter()
        self.refused_reasons: dict[str, str] = {}
        self.error_messages: list[str] = []
        self.tests_patched = 0
        self.tests_vgkernels = 0
        self.op_calls: collections.Counter = collections.Counter()
        self.in_test = False
        self._busy = False
        self._copy_depth = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._restore: list = []

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        from transformers import modeling_utils

        import vgkernels  # noqa: F401  (the public entry point must import)
        from vgkernels import _dispatch

        cls = modeling_utils.PreTrainedModel
        orig_post_init = cls.__dict__["post_init"]
        plugin = self

        @functools.wraps(orig_post_init)
        def post_init(model, *args, **kwargs):
            out = orig_post_init(model, *args, **kwargs)
            plugin.on_built(model)
            return out

        cls.post_init = post_init
        self._restore.append((cls, "post_init", orig_post_init))

        had_deepcopy = "__deepcopy__" in cls.__dict__
        orig_deepcopy = cls.__dict__.get("__deepcopy__")

        def __deepcopy__(model, memo):
            return plugin.deepcopy(model, memo, orig_deepcopy)

        cls.__deepcopy__ = __deepcopy__
        self._restore.append((cls, "__deepcopy__", orig_deepcopy if had_deepcopy else _DELETE))

        orig_get = _dispatch.get

        @functools.wraps(orig_get)
        def get(backend, device, op, *args, **kwargs):
            mod = orig_get(backend, device, op, *args, **kwargs)
            plugin._count_op(mod, op)
            return mod

        _dispatch.get = get
        self._restore.append((_dispatch, "get", orig_get))

    def uninstall(self) -> None:
        for owner, name, orig in reversed(self._restore):
            if orig is _DELETE:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._restore.clear()

    def deepcopy(self, model, memo, orig_deepcopy):
        """``copy.deepcopy`` of a model: the copy is a model the test built, patched on its own.

        A patched model is unpatched while it is copied (so the copy holds none of its
        hooks, configs or handle) and patched again afterwards; then the copy is offered to
        ``patch_model`` like any new instance. Parts copied along with a model are its.
        """
        rec = self._live_record(model)
        handle = rec.handle if rec is not None else None
        outermost = self._copy_depth == 0
        self._copy_depth += 1
        if handle is not None:
            handle.unpatch()
        try:
            if orig_deepcopy is not None:
                new = orig_deepcopy(model, memo)
            else:  # what copy.deepcopy does for an object without __deepcopy__
                new = copy._reconstruct(model, memo, *model.__reduce_ex__(4))
        finally:
            self._copy_depth -= 1
            if handle is not None:
                import vgkernels

                rec.handle = vgkernels.patch_model(model, capture="all", backend=self.backend)
        if outermost:
            self.on_built(new)
        return new

    def _live_record(self, model):
        for r in self.records + self.session_records:
            if not r.absorbed and r.handle is not None and r.model() is model:
                return r
        return None

    def _count_op(self, mod, op) -> None:
        """Wrap (once) the backend function ``_dispatch.get`` handed out for ``op``."""
        fn = getattr(mod, op, None) if isinstance(op, str) else None
        if fn is None or getattr(fn, "_vgpatch_counted", False) or op in NOT_ATTENTION:
            return
        plugin = self

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            res = fn(*args, **kwargs)
            plugin.op_calls[op] += 1
            plugin.total.calls += 1
            # attention returns (out, lse | None, probs | None): probs is a capture.
            if "capture" in op or (isinstance(res, tuple) and len(res) == 3 and res[2] is not None):
                plugin.total.captures += 1
            return res

        counted._vgpatch_counted = True
        self._restore.append((mod, op, fn))
        setattr(mod, op, counted)

    # ------------------------------------------------------------------ instances
    def on_built(self, model) -> None:
        # A second post_init() on a finished model (a test may call it) builds nothing new.
        if self._busy or model in self._seen:
            return
        self._seen.add(model)
        self._busy = True
        try:
            self._absorb(model)
            import vgkernels

            try:
                handle = vgkernels.patch_model(model, capture="all", backend=self.backend)
            except ValueError as e:
                rec = _Record(model, "refused", reason=str(e).splitlines()[0][:200])
            except Exception as e:  # a defect of the patch, reported at the test's teardown
                rec = _Record(model, "error", error=e, reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            else:
                rec = _Record(model, "patched", handle=handle)
            self.records.append(rec)
        finally:
            self._busy = False

    def _absorb(self, model) -> None:
        """Instances recorded earlier that are parts of ``model`` are not the test's: drop them."""
        live = [r for r in self.records if not r.absorbed and r.model() is not None]
        if not live:
            return
        inside = {id(m) for m in model.modules()}
        for r in live:
            m = r.model()
            if m is not None and m is not model and id(m) in inside:
                r.absorbed = True
                if r.handle is not None:
                    r.handle.unpatch()
                    r.handle = None

    def close(self, records: list[_Record]) -> dict:
        """Unpatch and count the given records; returns this batch's counts."""
        c = _Counters()
        errors = []
        for r in records:
            if r.absorbed:
                c.absorbed += 1
                continue
            if r.status == "patched":
                c.patched += 1
                h = r.handle
                if h is not None:
                    if getattr(h, "maps", None) is not None:
                        c.with_maps += 1
                    h.unpatch()
                    r.handle = None
            elif r.status == "refused":
                c.refused += 1
                self.refused_classes[r.cls] += 1
                self.refused_reasons.setdefault(r.cls, r.reason)
            else:
                c.errors += 1
                errors.append(r)
                self.error_messages.append(f"{r.cls}: {r.reason}")
        for f in ("patched", "refused", "errors", "absorbed", "with_maps"):
            setattr(self.total, f, getattr(self.total, f) + getattr(c, f))
        records.clear()
        return {"counts": c, "errors": errors}


# ---------------------------------------------------------------------- pytest hooks

_KEY = pytest.StashKey[VGPatch]()
_START = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("vgpatch", "vgkernels.patch_model on every model the tests build")
    group.addoption("--vgpatch-backend", default="auto", choices=("auto", "triton", "cuda", "torch"),
                    help="backend= passed to vgkernels.patch_model (default: auto)")
    group.addoption("--vgpatch-json", default=None, metavar="PATH",
                    help="write the session's counts (and why it failed, if it did) to PATH as JSON")


def pytest_configure(config):
    plugin = VGPatch(config.getoption("--vgpatch-backend"))
    plugin.install()
    config.stash[_KEY] = plugin


def pytest_unconfigure(config):
    plugin = config.stash.get(_KEY, None)
    if plugin is not None:
        plugin.close(plugin.records)
        plugin.uninstall()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    plugin = item.config.stash[_KEY]
    if plugin.records and not plugin.in_test:  # built at import/collection time: the session's
        plugin.session_records.extend(plugin.records)
        plugin.records.clear()
    plugin.in_test = True
    item.stash[_START] = plugin.total.snapshot()
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    plugin = item.config.stash[_KEY]
    try:
        result = yield
    finally:
        closed = plugin.close(plugin.records)
        plugin.in_test = False
        start = item.stash.get(_START, None) or _Counters().snapshot()
        now = plugin.total.snapshot()
        d = {f: now[f] - start[f] for f in now}
        if d["patched"]:
            plugin.tests_patched += 1
        if d["calls"]:
            plugin.tests_vgkernels += 1
        for name in ("patched", "refused", "errors", "calls", "captures"):
            item.user_properties.append((PROP_PREFIX + name, d[name]))
    if closed["errors"]:
        msgs = "; ".join(f"{r.cls}: {r.reason}" for r in closed["errors"])
        raise RuntimeError(f"vgpatch: vgkernels.patch_model(capture='all') failed on a model this test built: {msgs}") \
            from closed["errors"][0].error
    return result


def pytest_sessionfinish(session, exitstatus):
    plugin = session.config.stash.get(_KEY, None)
    if plugin is None:
        return
    plugin.close(plugin.records)
    plugin.close(plugin.session_records)
    t = plugin.total
    why = []
    if t.patched == 0:
        why.append("no model instance was patched")
    if t.calls == 0:
        why.append("no attention ran through vgkernels")
    if t.captures == 0:
        why.append("nothing was captured")
    plugin.failed_because = why
    if why and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    path = session.config.getoption("--vgpatch-json")
    if path:
        import json

        with open(path, "w") as f:
            json.dump({**t.snapshot(), "op_calls": dict(plugin.op_calls), "tests_patched": plugin.tests_patched,
                       "tests_vgkernels": plugin.tests_vgkernels, "refused_classes": dict(plugin.refused_classes),
                       "refused_reasons": plugin.refused_reasons,
                       "error_messages": sorted(set(plugin.error_messages)),
                       "failed_because": why}, f, indent=1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    plugin = config.stash.get(_KEY, None)
    if plugin is None:
        return
    t = plugin.total
    tr = terminalreporter
    tr.section("vgpatch: vgkernels.patch_model(capture='all') on every model built")
    tr.write_line(f"instances patched: {t.patched} (in {plugin.tests_patched} tests); maps produced by {t.with_maps}; "
                  f"parts absorbed into their composite: {t.absorbed}")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(plugin.op_calls.items()))
    tr.write_line(f"vgkernels kernel calls: {t.calls} ({ops or 'none'}), of which captures {t.captures}; "
                  f"tests where vgkernels ran: {plugin.tests_vgkernels}")
    refused = ", ".join(f"{k} x{v}" for k, v in sorted(plugin.refused_classes.items()))
    tr.write_line(f"instances left alone (patch_model refused): {t.refused}" + (f" [{refused}]" if refused else ""))
    for cls, reason in sorted(plugin.refused_reasons.items()):
        tr.write_line(f"  {cls}: {reason}")
    if plugin.error_messages:
        tr.write_line(f"patch_model FAILED on {t.errors} instances:", red=True)
        for m in sorted(set(plugin.error_messages)):
            tr.write_line(f"  {m}", red=True)
    why = getattr(plugin, "failed_because", [])
    if why:
        tr.write_line("vgpatch: FAILING the session: " + "; ".join(why), red=True, bold=True)

