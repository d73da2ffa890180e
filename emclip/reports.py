"""Reader-facing reports: notebooks executed headlessly, HTML a pathologist can read offline, an index per run.

* Kernels are started over IPC (not TCP) with progress bars off: a nested papermill run (04 runs 03 per arm) then
  leaves no "[IPKernelApp] WARNING | Kernel is running over TCP" block and no progress-bar widget in the report.
* HTML hides the code by default (``show_code=True`` keeps it) and needs no network: MathJax, require.js, jQuery
  and mermaid are not loaded from a CDN (the notebooks use none of them; widgets never reach a report).
* ``write_index`` writes ``index.html`` linking every notebook report and figure of a run's report folder.
* ``report_problems`` lists what a reader must never see in a report (warnings, tracebacks, kernel logs, CDN
  scripts); the test suite runs it on the ci reports.
"""
from __future__ import annotations

import html
import json
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from jupyter_client.manager import KernelManager

from .paths import project_root

__all__ = ['QuietKernelManager', 'execute_notebook', 'to_html', 'write_index', 'report_problems']

# What a report must not contain, as (name, pattern) pairs searched in the HTML text.
_PROBLEMS = (
    ('kernel log line', re.compile(r'\[IPKernelApp\]|Kernel is running over TCP|KeyboardInterrupt caught')),
    ('Python warning', re.compile(r'\b\w*Warning: |warnings\.warn\(')),
    ('traceback', re.compile(r'Traceback \(most recent call last\)|<span class="ansi-red-fg">-{5,}')),
    ('network script', re.compile(r'<script[^>]+src="https?://|from\s+[\'"]https?://|import\s*\(\s*[\'"]https?://')),
)


class QuietKernelManager(KernelManager):
    """A kernel on IPC transport with tqdm bars disabled (``TQDM_DISABLE``): nothing of the machinery reaches the
    executed notebook."""

    def __init__(self, **kwargs):
        kwargs.setdefault('transport', 'ipc')
        if kwargs['transport'] == 'ipc' and 'ip' not in kwargs:
            # a socket path of its own: kernels started at once from one process would otherwise race for the same
            # default 'kernel-ipc-N' files and read each other's messages (invalid signatures)
            kwargs['ip'] = os.path.join(tempfile.gettempdir(), f'emclip-kernel-{uuid.uuid4().hex[:12]}')
        super().__init__(**kwargs)

    extra_env: dict = {}
    log_path: str | None = None   # the kernel process's own stdout/stderr (ipykernel's log lines) go here
    kernel_cwd: str | None = None  # the kernel's working directory (the notebooks folder: relative paths in cells)

    def start_kernel(self, **kwargs):
        if self.kernel_cwd is not None:
            kwargs['cwd'] = self.kernel_cwd
        env = dict(kwargs.pop('env', None) or os.environ)
        env['TQDM_DISABLE'] = '1'
        env.update(self.extra_env)
        if self.log_path is not None:
            # a kernel started from inside a notebook (04 runs 03 per arm) would otherwise write its log lines, e.g.
            # "KeyboardInterrupt caught in kernel" from the SIGINT jupyter_client sends at every shutdown, into the
            # output of the cell that started it
            log = open(self.log_path, 'ab')   # noqa: SIM115 - the child keeps its own copy of the descriptor
            try:
                return super().start_kernel(env=env, stdout=log, stderr=log, **kwargs)
            finally:
                log.close()
        return super().start_kernel(env=env, **kwargs)


_TIMINGS_LOCK = threading.Lock()

PROJECT_KERNEL = 'emclip'   # registered by `make install` into the environment (ipykernel install --sys-prefix)


def _interpreter(path: str) -> Path:
    """An interpreter's path with its folders resolved (``notebooks/../.venv``, a symlinked ``.venv``) but not the
    executable itself: a venv's ``python`` links to the base interpreter, which every venv shares."""
    path = Path(path).absolute()
    return Path(os.path.realpath(path.parent)) / path.name


def project_kernel() -> str:
    """The name of the project's Jupyter kernel, after checking that it is registered and runs this environment's
    Python (a kernel of the same name from another checkout or environment would run other code)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    how = (f"run `make install`, or `{sys.executable} -m ipykernel install --sys-prefix --name {PROJECT_KERNEL} "
           f"--display-name 'Python (emclip)'`")
    try:
        spec = KernelSpecManager().get_kernel_spec(PROJECT_KERNEL)
    except NoSuchKernel:
        raise RuntimeError(f"the project's Jupyter kernel {PROJECT_KERNEL!r} is not registered: {how}") from None
    if _interpreter(spec.argv[0]) != _interpreter(sys.executable):
        raise RuntimeError(f"the Jupyter kernel {PROJECT_KERNEL!r} ({spec.resource_dir}) runs {spec.argv[0]}, not "
                           f"this environment's {sys.executable}: remove it (`jupyter kernelspec remove "
                           f"{PROJECT_KERNEL}`) and {how}")
    return PROJECT_KERNEL


def execute_notebook(name: str, out_dir: str | Path, parameters: dict | None = None, html_copy: bool = True,
                     cwd: str | Path | None = None, show_code: bool = False, env: dict | None = None) -> Path:
    """Run ``notebooks/<name>.ipynb`` with papermill into ``out_dir`` (+ an HTML copy); returns the output path and
    records its wall time in ``out_dir/timings.json``. ``env`` adds variables to the kernel's environment (e.g.
    ``OMP_NUM_THREADS`` when several notebooks run at once)."""
    import papermill as pm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = project_root() / 'notebooks' / f'{name}.ipynb'
    out = out_dir / f'{name}.ipynb'
    # a subclass per call carries the extra variables: notebooks run from several threads share no state
    # the kernel starts in ``cwd`` itself: papermill's own cwd= would chdir this whole process for the run, and
    # notebooks executed from several threads at once (run_notebooks' stages, 04's arms) would leave it anywhere
    manager = type('KernelManager', (QuietKernelManager,), {'extra_env': dict(env or {}),
                                                          'log_path': str(out_dir / f'{name}.kernel.log'),
                                                          'kernel_cwd': str(cwd or source.parent)})
    start = time.perf_counter()
    pm.execute_notebook(str(source), str(out), parameters=parameters or {}, cwd=None,
                        progress_bar=False, kernel_name=project_kernel(), kernel_manager_class=manager)
    seconds = time.perf_counter() - start
    if html_copy:
        to_html(out, show_code=show_code)
    with _TIMINGS_LOCK:   # notebooks running at once (run_notebooks' stages) share one timings.json
        timings = out_dir / 'timings.json'
        data = json.loads(timings.read_text()) if timings.exists() else {}
        data[name] = round(seconds, 1)
        timings.write_text(json.dumps(data, indent=2) + '\n')
    return out


def to_html(notebook: str | Path, show_code: bool = False) -> Path:
    """``notebook`` as a self-contained HTML file beside it: outputs only unless ``show_code``, no CDN scripts."""
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop('widgets', None)  # widget state would pull its renderer from a CDN
    exporter = HTMLExporter(exclude_input=not show_code, exclude_input_prompt=not show_code,
                            exclude_output_prompt=not show_code)
    exporter.mathjax_url = exporter.require_js_url = exporter.jquery_url = ''
    exporter.log.setLevel('ERROR')  # "Alternative text is missing" on figure outputs is not the reader's problem
    body, _ = exporter.from_notebook_node(nb)
    # drop script tags left without a source and the mermaid module loader (no diagrams in these notebooks)
    body = re.sub(r'<script src=""></script>\s*', '', body)
    body = re.sub(r'<script type="module">(?:(?!</script>).)*mermaid(?:(?!</script>).)*</script>\s*', '', body,
                  flags=re.S)
    out = Path(notebook).with_suffix('.html')
    out.write_text(body)
    return out


def report_problems(text: str) -> list[str]:
    """What a reader must not see in a report: one line per kind found, with the first match."""
    found = []
    for name, pattern in _PROBLEMS:
        m = pattern.search(text)
        if m:
            found.append(f'{name}: {text[max(0, m.start() - 60):m.end() + 60]!r}')
    return found


_INDEX_STYLE = ('body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}'
                'h1{font-weight:500}li{margin:.3em 0}.figs{display:flex;flex-wrap:wrap;gap:12px}'
                '.figs a{display:block;width:250px;font-size:.8em;color:#444;text-decoration:none}'
                '.figs img{width:250px;border:1px solid #ddd}table{border-collapse:collapse}'
                'td{padding:2px 10px 2px 0}')


def write_index(out_dir: str | Path, title: str, summary_html: str = '') -> Path:
    """``out_dir/index.html``: the run's notebook reports in order, then every figure (PNG) below ``out_dir``."""
    out_dir = Path(out_dir)
    timings = json.loads((out_dir / 'timings.json').read_text()) if (out_dir / 'timings.json').exists() else {}
    pages = sorted(out_dir.glob('[0-9][0-9]_*.html'))
    items = ''.join(f'<li><a href="{p.name}">{html.escape(p.stem.replace("_", " ", 1))}</a>'
                    f'{f" <small>({timings[p.stem]:.0f} s)</small>" if p.stem in timings else ""}</li>'
                    for p in pages)
    nested = sorted(p for p in out_dir.glob('*/**/*.html'))
    nested_items = ''.join(f'<li><a href="{p.relative_to(out_dir).as_posix()}">'
                           f'{html.escape(p.relative_to(out_dir).as_posix())}</a></li>' for p in nested)
    figures = ''.join(f'<a href="{f.relative_to(out_dir).as_posix()}"><img src="{f.relative_to(out_dir).as_posix()}"'
                      f' alt="{html.escape(f.stem)}" loading="lazy">{html.escape(f.relative_to(out_dir).as_posix())}'
                      f'</a>' for f in sorted(out_dir.rglob('*.png')) if 'ablations' not in f.parts)
    total = f'<p>Total wall time: {timings["total"]:.0f} s.</p>' if 'total' in timings else ''
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_INDEX_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary_html}{total}'
            f'<h2>Reports</h2><ol>{items}</ol>'
            + (f'<h2>Runs inside the reports</h2><ul>{nested_items}</ul>' if nested_items else '')
            + f'<h2>Figures</h2><div class="figs">{figures}</div></body></html>')
    path = out_dir / 'index.html'
    path.write_text(page)
    return path
