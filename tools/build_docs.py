"""Build the docs site without quarto: `python tools/build_docs.py` writes `_site/<page>.html`, one page per notebook.

quarto's `nbdev_docs` stays the real build (GitHub Pages, `.github/workflows/deploy.yaml`); quarto cannot be installed
everywhere, so this script renders the same content with pandoc only. Each notebook in `nbs/` goes through nbdev's own
processing -- `NBProcessor` with `FilterDefaults().procs()`, the step `nbdev_docs` runs before quarto: front matter from
the `# Title` cell, a `show_doc` cell after each `#| export` definition, executed to get its markdown signature, hidden
and exported cells dropped, backticked names linked -- then becomes markdown and is rendered by pandoc into
`_site/<page>.html` (nbdev's page names: `00_core.ipynb` -> `core.html`, `index.ipynb` -> `index.html`) with a
sidebar linking every page, grouped and ordered as `nbs/sidebar.yml` (quarto's `website: sidebar: contents:`, kept by
nbdev when settings.ini has `custom_sidebar = True`) groups them. Links to the online docs become relative links.

    python tools/build_docs.py                       # every notebook -> _site/
    python tools/build_docs.py --dest /tmp/site 00_core.ipynb
"""
from __future__ import annotations
import argparse, base64, html, json, os, re, shutil, subprocess, sys, warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

root = Path(__file__).resolve().parent.parent
_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
_re_directive = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

SITE_CSS = """
body { max-width: 72em; padding: 0 2em 3em 17em; margin: 0 auto; font-family: system-ui, -apple-system, "Segoe UI",
  Roboto, "Helvetica Neue", Arial, sans-serif; line-height: 1.5; color: #212529; }
a { color: #2761e3; }
nav.site-nav { position: fixed; top: 0; bottom: 0; left: 0; width: 14.5em; overflow-y: auto; z-index: 10;
  box-sizing: border-box; padding: 1em 0.8em 2em 1.2em; background: #f7f8fa; border-right: 1px solid #e5e5e5;
  font-size: 0.9em; }
nav.site-nav a.site-brand { display: block; font-weight: bold; font-size: 1.3em; color: #2780e3; text-decoration: none; }
nav.site-nav .nav-group-title { margin: 1.1em 0 0.25em 0; font-size: 0.78em; font-weight: 600; letter-spacing: 0.05em;
  text-transform: uppercase; color: #6c757d; }
nav.site-nav ul { list-style: none; margin: 0; padding: 0; }
nav.site-nav li a { display: block; padding: 0.12em 0.45em; border-radius: 3px; color: #212529; text-decoration: none; }
nav.site-nav li a:hover { background: #e9ecef; }
nav.site-nav li a.active { background: #e3eefc; color: #2761e3; font-weight: 600; }
@media (max-width: 50em) {
  body { padding-left: 1.2em; padding-right: 1.2em; }
  nav.site-nav { position: static; width: auto; margin: 0 -1.2em 1em -1.2em; border-right: none;
    border-bottom: 1px solid #e5e5e5; }
}
nav#TOC { float: right; width: 16em; margin: 0 0 1em 1.5em; padding: 0.5em 0.8em; font-size: 0.85em;
  border-left: 2px solid #e5e5e5; }
nav#TOC ul { padding-left: 1em; }
h3.doc-title { margin-top: 0.3em; }
pre { overflow-x: auto; }
div.sourceCode { margin: 0.5em 0; background: #f6f8fa; border-radius: 4px; padding: 0.1em 0.6em; }
.cell-output div.sourceCode, .cell-output pre { background: none; }
img { max-width: 100%; }
"""

def get_cfg():
    "nbdev's config (settings.ini) of this repo"
    from nbdev.config import get_config
    return get_config(path=root)

def _sidebar_entries(entries):
    "(file, label) of each page sidebar `entries` name (a file, or `href:` with an optional `text:`), sections flattened"
    res = []
    for e in entries or []:
        if isinstance(e, dict) and 'contents' in e: res += _sidebar_entries(e['contents'])
        elif isinstance(e, dict) and e.get('href'): res.append((str(e['href']), e.get('text')))
        elif isinstance(e, str) and e.endswith(('.ipynb', '.qmd', '.md')): res.append((e, None))
    return res

def sidebar_groups(nbs_path:Path|None=None):
    "The groups of `nbs_path/sidebar.yml` in order: (title, [(notebook, label or None)]), title '' outside a section"
    import yaml
    yml = Path(nbs_path or get_cfg().nbs_path)/'sidebar.yml'
    if not yml.exists(): return []
    contents = (((yaml.safe_load(yml.read_text()) or {}).get('website') or {}).get('sidebar') or {}).get('contents') or []
    groups = []
    for e in contents:
        if isinstance(e, dict) and 'section' in e and 'contents' in e:
            groups.append((str(e['section']), _sidebar_entries(e['contents'])))
        elif groups and groups[-1][0] == '': groups[-1][1].extend(_sidebar_entries([e]))
        else: groups.append(('', _sidebar_entries([e])))
    return groups

def doc_notebooks(nbs_path:Path|None=None):
    "The notebooks that become pages, in sidebar.yml's order; any it does not list come last, in nbdev's order"
    from nbdev.quarto import _sort
    nbs_path = Path(nbs_path or get_cfg().nbs_path)
    files = [p for p in nbs_path.rglob('*.ipynb')
             if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs_path).parts)]
    files = sorted(files, key=lambda p: _sort((p.parent, p.name)))
    order = {}
    for _, entries in sidebar_groups(nbs_path):
        for f, _ in entries: order.setdefault(Path(f).as_posix(), len(order))
    return sorted(files, key=lambda p: order.get(p.relative_to(nbs_path).as_posix(), len(order)))

def page_name(nb_path:Path, nbs_path:Path|None=None):
    "Output file of a notebook, as nbdev names it (`00_core.ipynb` -> `core.html`)"
    from nbdev.doclinks import _nbpath2html
    nb_path = Path(nb_path)
    rel = nb_path.relative_to(nbs_path) if nbs_path and nb_path.is_relative_to(nbs_path) else Path(nb_path.name)
    return _nbpath2html(rel).as_posix()

@contextmanager
def _working_dir(path):
    old = Path.cwd()
    os.chdir(path)
    try: yield
    finally: os.chdir(old)

def process_nb(nb_path:Path):
    "Run nbdev's docs processors on `nb_path` (as `nbdev_docs` does) and return the processed notebook"
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults
    nb_path = Path(nb_path).resolve()
    nb = read_nb(nb_path)
    old = os.environ.get('IN_TEST')
    os.environ['IN_TEST'] = '1'  # as nbdev's serve_drv does while processing
    try:
        with _working_dir(nb_path.parent), warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            NBProcessor(nb=nb, procs=FilterDefaults().procs()).process()
        nb.warnings_ = [str(w.message).strip() for w in ws]
    except Exception as e:
        hint = ("\n(nbdev's docs processing runs only the export cells and the cells that import something; a cell that "
                "mixes imports with code needing earlier cells fails here and in quarto's `nbdev_docs` alike: move "
                "its imports into a cell of their own)") if 'Error in' in str(e) else ''
        raise RuntimeError(f"nbdev's docs processing failed for {nb_path.name}: {e}{hint}") from e
    finally:
        if old is None: os.environ.pop('IN_TEST', None)
        else: os.environ['IN_TEST'] = old
    return nb

def _fence(text, ch='`'):
    runs = re.findall(ch + '{3,}', text)
    return ch * max([3] + [len(r) + 1 for r in runs])

def _code_block(text, lang='', cls=None):
    text = text.rstrip('\n')
    f = _fence(text)
    attrs = lang if not cls else '{' + ' '.join(([f'.{lang}'] if lang else []) + [f'.{c}' for c in cls]) + '}'
    return f'{f}{attrs}\n{text}\n{f}'

def _div(body, *classes):
    f = _fence(body, ':')
    return f"{f} {{{' '.join('.' + c for c in classes)}}}\n{body}\n{f}"

class _Links:
    "Turns links to the online docs and to notebooks into links between the local pages"
    def __init__(self, cfg, nb_pages):
        base = (cfg.get('doc_host', '') or '').rstrip('/') + '/' + (cfg.get('doc_baseurl', '') or '').strip('/')
        self.base = base.rstrip('/') + '/'
        self.nb_pages = nb_pages  # notebook file name -> page name

    def _nb_link(self, m):
        target, frag = m.group(2), m.group(3) or ''
        page = self.nb_pages.get(Path(target).name)
        return f'{m.group(1)}{page}{frag}' if page else m.group(0)

    def __call__(self, md):
        if self.base != '/': md = md.replace(self.base, '')
        return re.sub(r'(\]\(|href=")(?!\w+://)([^)"#\s]+\.ipynb)(#[^)"\s]*)?', self._nb_link, md)

def _doc_headings(md):
    "Give `show_doc` headings (`### Learner.fit`) the anchor nbdev's doc links use (`#learner.fit`), keeping `_`"
    def f(m):
        name = m.group(2).strip()
        if '{' in name: return m.group(0)
        return f"{m.group(1)} {name.replace('_', chr(92) + '_')} {{#{name.lower()} .doc-title}}"
    return re.sub(r'^(#{1,6})\s+(\S+)\s*$', f, md, flags=re.M)

def _split_directives(cell):
    "Quarto cell options: the directives nbdev extracted plus the `#|` lines processors put back; source without them"
    opts = {k.rstrip(':'): ' '.join(v) for k, v in getattr(cell, 'directives_', {}).items()}
    lines = cell.source.splitlines()
    while lines and _re_directive.match(lines[0]):
        m = _re_directive.match(lines.pop(0))
        opts[m.group(1)] = m.group(2).strip('"\'')
    return opts, '\n'.join(lines).strip('\n')

def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')

class _Page:
    def __init__(self, nb, stem, dest, links):
        self.nb, self.stem, self.dest, self.links, self.nfig = nb, stem, Path(dest), links, 0

    def _figure(self, data, ext):
        self.nfig += 1
        rel = f'figs/{self.stem}_{self.nfig}.{ext}'
        (self.dest/'figs').mkdir(parents=True, exist_ok=True)
        (self.dest/rel).write_bytes(base64.b64decode(_text(data)))
        return f'![]({rel})'

    def output(self, o, asis):
        t = o.get('output_type')
        if t == 'stream':
            txt = _re_ansi.sub('', _text(o.get('text')))
            return _div(_code_block(txt), 'cell-output', f"cell-output-{o.get('name', 'stdout')}") if txt.strip() else ''
        if t == 'error':
            tb = _re_ansi.sub('', '\n'.join(o.get('traceback', [])) or f"{o.get('ename')}: {o.get('evalue')}")
            return _div(_code_block(tb), 'cell-output', 'cell-output-error')
        d = o.get('data', {})
        if asis and 'text/markdown' in d: return _doc_headings(self.links(_text(d['text/markdown'])))
        if 'image/png' in d: body = self._figure(d['image/png'], 'png')
        elif 'image/jpeg' in d: body = self._figure(d['image/jpeg'], 'jpg')
        elif 'image/svg+xml' in d: body = _code_block(_text(d['image/svg+xml']), '{=html}')
        elif 'text/html' in d: body = _code_block(self.links(_text(d['text/html'])), '{=html}')
        elif 'text/markdown' in d: body = self.links(_text(d['text/markdown']))
        elif 'text/plain' in d: body = _code_block(_re_ansi.sub('', _text(d['text/plain'])))
        else: return ''
        return _div(body, 'cell-output', 'cell-output-display')

    def code_cell(self, cell):
        opts, src = _split_directives(cell)
        if opts.get('include', '').lower() == 'false': return ''
        asis = opts.get('output', '').lower() == 'asis'
        parts = []
        if src and opts.get('echo', '').lower() != 'false':
            block = _code_block(src, 'python')
            if 'code-fold' in opts:
                summary = html.escape(opts.get('code-summary') or 'Code')
                block = f'<details class="code-fold">\n<summary>{summary}</summary>\n\n{block}\n\n</details>'
            parts.append(block)
        if opts.get('output', '').lower() != 'false':
            parts += [s for s in (self.output(o, asis) for o in cell.get('outputs', [])) if s]
        if not parts: return ''
        if asis and len(parts) == 1 and not src.startswith('#') and opts.get('echo', '').lower() == 'false':
            return parts[0]  # a show_doc: its markdown goes straight into the page, as with quarto's `output: asis`
        return _div('\n\n'.join(parts), 'cell')

    def markdown(self):
        out = []
        for cell in self.nb.cells:
            if cell.cell_type == 'markdown': out.append(self.links(cell.source))
            elif cell.cell_type == 'code': out.append(self.code_cell(cell))
            elif cell.cell_type == 'raw' and not cell.source.lstrip().startswith('---'): out.append(cell.source)
        return '\n\n'.join(s for s in out if s and s.strip()) + '\n'

def nav_groups(pages, nbs_path:Path):
    "The built `pages` grouped as sidebar.yml groups them: [(title, [(page, label)])]; unlisted pages in a last group"
    by_nb = {(p['notebook'].relative_to(nbs_path) if p['notebook'].is_relative_to(nbs_path) else Path(p['notebook'].name)
              ).as_posix(): p for p in pages}
    res, seen = [], set()
    for title, entries in sidebar_groups(nbs_path):
        items = []
        for f, label in entries:
            p = by_nb.get(Path(f).as_posix())
            if p is None or p['page'] in seen: continue
            seen.add(p['page'])
            items.append((p['page'], str(label or p['title'])))
        if items: res.append((title, items))
    rest = [(p['page'], p['title']) for p in pages if p['page'] not in seen]
    if rest: res.append(('More pages' if res else '', rest))
    return res

def _nav_html(groups, current, site_title):
    "The sidebar of page `current`: the site's name, then each group's heading and links"
    up = '../' * current.count('/')
    items = [f'<a class="site-brand" href="{up}index.html">{html.escape(site_title)}</a>']
    for i, (title, links) in enumerate(groups):
        head = f'<div class="nav-group-title" id="site-nav-group-{i}">{html.escape(title)}</div>\n' if title else ''
        lis = ''.join(f'<li><a href="{up}{page}"' + (' class="active" aria-current="page"' if page == current else '')
                      + f'>{html.escape(label)}</a></li>\n' for page, label in links)
        label = f' role="group" aria-labelledby="site-nav-group-{i}"' if title else ''
        items.append(f'<div class="nav-group"{label}>\n{head}<ul>\n{lis}</ul>\n</div>')
    return '<nav class="site-nav" aria-label="Pages">\n' + '\n'.join(items) + '\n</nav>\n'

def _copy_md_assets(md, nb_dir, dest):
    "Copy images that markdown cells reference by relative path"
    for rel in re.findall(r'!\[[^\]]*\]\((?!\w+://)([^)\s]+)', md):
        src = (nb_dir/rel)
        if src.is_file() and not rel.startswith('figs/'):
            (dest/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest/rel)

def _pandoc(md_path, out_path, nav_path, css):
    cmd = ['pandoc', str(md_path), '-f', 'markdown', '-t', 'html5', '--standalone', '--toc', '--toc-depth=3',
           '--include-before-body', str(nav_path), '-o', str(out_path)] + [a for c in css for a in ('--css', c)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'pandoc failed on {md_path.name}:\n{r.stderr}')

def build(dest:str|Path=root/'_site', # Output folder (emptied first)
          nbs:list|None=None, # Notebooks to render (default: every notebook in nbs/)
          nbs_path:str|Path|None=None, # Folder of the notebooks (default: settings.ini's nbs_path)
          quiet:bool=False, # Don't print progress
          keep_going:bool=False): # Skip notebooks that fail to process (listed in the result's `failed`) instead of raising
    "Build the docs site into `dest`; returns one dict per page (notebook, page, title, description)"
    if not shutil.which('pandoc'): raise RuntimeError('pandoc not found: install it (apt-get install pandoc)')
    cfg = get_cfg()
    nbs_path = Path(nbs_path or cfg.nbs_path).resolve()
    nb_files = [Path(n) if Path(n).is_absolute() else nbs_path/n for n in nbs] if nbs else doc_notebooks(nbs_path)
    dest = Path(dest).resolve()
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
    links = _Links(cfg, {p.name: page_name(p, nbs_path) for p in nb_files})
    site_title = cfg.get('title', cfg.lib_name)
    pages, failed = [], {}
    with _working_dir(root):
        for nb_path in nb_files:
            try: nb = process_nb(nb_path)
            except RuntimeError as e:
                if not keep_going: raise
                failed[page_name(nb_path, nbs_path)] = str(e)
                if not quiet: print(f'FAILED {nb_path.name}: {e}', flush=True)
                continue
            fm = getattr(nb, 'frontmatter_', {}) or {}
            page = fm.get('output-file') or page_name(nb_path, nbs_path)
            title = str(fm.get('title') or Path(page).stem)
            md = _Page(nb, Path(page).stem, dest, links).markdown()
            _copy_md_assets(md, nb_path.parent, dest)
            pages.append(dict(notebook=nb_path, page=page, title=title, description=str(fm.get('description', '')),
                              md=md))
            if not quiet:
                n = len(getattr(nb, 'warnings_', []))
                print(f'processed {nb_path.name} -> {page}' + (f' ({n} nbdev warnings)' if n else ''), flush=True)
    styles = nbs_path/'styles.css'
    css = []
    if styles.exists(): shutil.copy(styles, dest/'styles.css'); css.append('styles.css')
    (dest/'site.css').write_text(SITE_CSS); css.append('site.css')
    work = dest/'.build'
    work.mkdir()
    groups = nav_groups(pages, nbs_path)
    def render(p):
        stem = Path(p['page']).stem
        meta = dict(title=p['title'], pagetitle=site_title if p['title'] == site_title else f"{site_title} - {p['title']}")
        if p['description']: meta['subtitle'] = p['description']
        md_path, nav_path = work/f'{stem}.md', work/f'{stem}.nav.html'
        md_path.write_text('---\n' + ''.join(f'{k}: {json.dumps(v)}\n' for k, v in meta.items()) + '---\n\n' + p['md'])
        nav_path.write_text(_nav_html(groups, p['page'], site_title))
        (dest/p['page']).parent.mkdir(parents=True, exist_ok=True)
        _pandoc(md_path, dest/p['page'], nav_path, ['../' * p['page'].count('/') + c for c in css])
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex: list(ex.map(render, pages))
    shutil.rmtree(work)
    for p in pages: del p['md']
    if not quiet: print(f'wrote {len(pages)} pages to {dest}' + (f'; {len(failed)} notebooks failed' if failed else ''))
    return (pages, failed) if keep_going else pages

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to render (default: all in nbs/)')
    ap.add_argument('--dest', default=str(root/'_site'), help='output folder (default: _site)')
    ap.add_argument('--keep-going', action='store_true', help='render the other pages when a notebook fails')
    a = ap.parse_args()
    try: res = build(a.dest, a.notebooks or None, keep_going=a.keep_going)
    except RuntimeError as e: sys.exit(str(e))
    if a.keep_going and res[1]: sys.exit(f'{len(res[1])} notebooks failed: ' + ', '.join(res[1]))
