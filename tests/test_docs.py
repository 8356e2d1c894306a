"""The docs site as a reader meets it: build it with `tools/build_docs.py` (nbdev's own notebook processing, then pandoc),
open every page in headless Chromium and check the page title, a signature section for each public name of the
notebook's module, no leftover `#|` directive or `{target=...}` text, that every internal link resolves, and that the
screenshot is not blank. Screenshots are kept in `$TMPDIR/fastcb-docs-screenshots/` (the core and learner pages are
named in the output). Skips when pandoc or chromium is missing (`apt-get install pandoc chromium`)."""
import importlib, importlib.util, inspect, json, os, re, shutil, subprocess, sys, tempfile, warnings
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit
import pytest
from conftest import shared_dir

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root/'tools'))
import build_docs  # noqa: E402

CHROMIUM = next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(b)), None)
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--hide-scrollbars']
SHOTS = Path(tempfile.gettempdir())/'fastcb-docs-screenshots'
KEEP_SHOTS = ('core.html', 'learner.html')

_missing = [t for t, ok in (('pandoc', shutil.which('pandoc')), ('chromium', CHROMIUM)) if not ok]
pytestmark = [pytest.mark.skipif(bool(_missing), reason=f"docs browser check needs {' and '.join(_missing)} "
                                 f"(apt-get install pandoc chromium)")]

# ---------------------------------------------------------------- reading the page Chromium rendered
class Dom(HTMLParser):
    "What a check needs from a rendered page: title, ids, links, headings and code blocks in order, visible text"
    _void = {'area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'source', 'track', 'wbr'}
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.title, self.ids, self.links, self.blocks, self.prose, self.code, self.inline = '', set(), [], [], [], [], []
        self._stack, self._h, self._pre = [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ('id', 'name'):
            if a.get(k) and (k == 'id' or tag == 'a'): self.ids.add(a[k])
        if tag in ('a', 'link') and a.get('href'): self.links.append((tag, a['href']))
        if tag in ('img', 'script') and a.get('src'): self.links.append((tag, a['src']))
        if tag in self._void: return
        self._stack.append(tag)
        if re.fullmatch(r'h[1-6]', tag): self._h = [int(tag[1]), a.get('id', ''), a.get('class', ''), '']
        if tag == 'pre': self._pre = ''

    def handle_endtag(self, tag):
        if tag in self._void or tag not in self._stack: return
        while self._stack and self._stack.pop() != tag: pass
        if re.fullmatch(r'h[1-6]', tag) and self._h:
            self.blocks.append(('h', *self._h)); self._h = None
        if tag == 'pre' and self._pre is not None:
            self.blocks.append(('pre', self._pre)); self.code.append(self._pre); self._pre = None

    def handle_data(self, data):
        if 'title' in self._stack and 'head' in self._stack: self.title += data
        if {'script', 'style', 'head'} & set(self._stack): return
        if self._h is not None: self._h[3] += data
        if self._pre is not None: self._pre += data
        elif 'code' in self._stack: self.inline.append(data)
        else: self.prose.append(data)
        if self._h is None and self._pre is None and data.strip(): self.blocks.append(('t', data))

    def heading(self, hid):
        return next((i for i, b in enumerate(self.blocks) if b[0] == 'h' and b[2] == hid), None)

    def section(self, i):
        "The blocks after heading `i`, up to the next heading of the same or a higher level"
        res = []
        for b in self.blocks[i+1:]:
            if b[0] == 'h' and b[1] <= self.blocks[i][1]: break
            res.append(b)
        return res

    def section_code(self, i):
        "Text of the code blocks after heading `i`, up to the next heading of the same or a higher level"
        res = []
        for b in self.blocks[i+1:]:
            if b[0] == 'h' and b[1] <= self.blocks[i][1]: break
            if b[0] == 'pre': res.append(b[1])
        return '\n'.join(res)

def chromium(*args, timeout=90):
    with tempfile.TemporaryDirectory(prefix='fastcb-chromium-') as prof:
        r = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f'--user-data-dir={prof}', *args],
                           capture_output=True, text=True, timeout=timeout)
    return r

def dump_dom(path):
    r = chromium('--dump-dom', Path(path).resolve().as_uri())
    if r.returncode or '<html' not in r.stdout:
        raise RuntimeError(f'chromium could not render {path}: rc={r.returncode}\n{r.stderr[-2000:]}')
    return r.stdout

def screenshot(path, png):
    png.unlink(missing_ok=True)
    r = chromium(f'--screenshot={png}', '--window-size=1280,1600', Path(path).resolve().as_uri())
    if not png.exists(): raise RuntimeError(f'chromium wrote no screenshot of {path}: rc={r.returncode}\n{r.stderr[-2000:]}')
    return png

def blank_reason(png):
    "Why the screenshot `png` looks blank, or '' when it shows content"
    try: from PIL import Image
    except ImportError: return '' if png.stat().st_size > 8000 else f'{png} is only {png.stat().st_size} bytes'
    im = Image.open(png).convert('L')
    hist = im.histogram()
    bg = max(range(256), key=hist.__getitem__)
    ink = sum(n for v, n in enumerate(hist) if abs(v - bg) > 40) / (im.width * im.height)
    return '' if ink > 0.005 else f'{png} is blank ({ink:.2%} of pixels differ from the background)'

# ---------------------------------------------------------------- the checks
def link_problems(site, page, dom, doms, failed=()):
    "Internal links (and images, stylesheets) of `page` that do not resolve: 'page: link (why)'"
    base = build_docs._Links(build_docs.get_cfg(), {}).base
    res, site = [], Path(site).resolve()
    for tag, href in dom.links:
        if base != '/' and href.startswith(base):
            res.append(f'{page}: {href} (absolute link to the online docs; should be relative)'); continue
        parts = urlsplit(href)
        if parts.scheme or href.startswith('//'): continue  # external: not checked offline
        target = (site/page).parent/unquote(parts.path) if parts.path else site/page
        target = target.resolve()
        rel = target.relative_to(site).as_posix() if target.is_relative_to(site) else None
        if rel in failed: continue  # that notebook failed to build; reported on its own
        if rel is None: res.append(f'{page}: {href} (points outside the site)'); continue
        if not target.is_file(): res.append(f'{page}: {href} ({rel} does not exist)'); continue
        if parts.fragment and tag == 'a':
            ids = doms[rel].ids if rel in doms else Dom(target.read_text(errors='replace')).ids
            frag = unquote(parts.fragment)
            if frag not in ids:
                hint = ('; nbdev links every backticked name it knows, but a private name has no doc section: drop '
                        'the backticks or add a show_doc for it') if frag.startswith('_') else ''
                res.append(f'{page}: {href} (no anchor #{frag} in {rel}{hint})')
    return res

def public_names(nb_path):
    "Public names a notebook's module defines itself, split into (functions and classes, other objects)"
    nb = json.loads(Path(nb_path).read_text())
    src = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
    m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', src, re.M)
    if not m: return [], []
    mod = importlib.import_module(f"{build_docs.get_cfg().lib_name}.{m.group(1)}")
    msrc = inspect.getsource(mod)
    defs, data = [], []
    for n in getattr(mod, '__all__', []):
        o = getattr(mod, n)
        if inspect.isclass(o) or inspect.isfunction(o):
            if getattr(o, '__module__', None) == mod.__name__: defs.append(n)
        elif re.search(rf'^(?:[\w\s,]*,\s*)?{re.escape(n)}\b[^\n=()]*=(?!=)', msrc, re.M): data.append(n)
    return defs, data

def nb_title(nb_path):
    nb = json.loads(Path(nb_path).read_text())
    md = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    return re.search(r'^#\s+(.+?)\s*$', md, re.M).group(1)

def page_problems(site, page, nb_path, dom, doms, failed=()):
    "Everything wrong with one rendered page, each naming the page"
    res = []
    title, site_title = nb_title(nb_path), build_docs.get_cfg().title
    want = site_title if title == site_title else f'{site_title} - {title}'
    if dom.title.strip() != want: res.append(f'{page}: page title is {dom.title.strip()!r}, expected {want!r}')
    h1 = [b for b in dom.blocks if b[0] == 'h' and b[1] == 1]
    if not h1 or h1[0][4].strip() != title: res.append(f"{page}: first heading is {h1[0][4].strip() if h1 else None!r}, expected {title!r}")
    defs, data = public_names(nb_path)
    for n in defs:
        i = dom.heading(n.lower())
        if i is None: res.append(f'{page}: no signature section for {n} (no heading #{n.lower()})')
        elif not re.search(rf'\b{re.escape(n)}\s*\(', dom.section_code(i)):
            res.append(f'{page}: the section of {n} shows no signature `{n}(...)`')
    for n in data:
        if dom.heading(n.lower()) is None and not any(re.match(rf'{re.escape(n)}\b', c) for c in dom.inline):
            res.append(f'{page}: public name {n} is not documented on the page')
    for code in dom.code:
        for line in code.splitlines():
            if re.match(r'\s*#\|', line): res.append(f'{page}: raw directive in a code block: {line.strip()!r}')
    prose = ''.join(dom.prose)
    for m in re.finditer(r'#\|\s*[\w-]+', prose): res.append(f'{page}: raw directive in the text: {m.group(0)!r}')
    for m in re.finditer(r'\{target=[^}]*\}?', prose + '\n'.join(dom.code)):
        res.append(f'{page}: raw link attributes in the text: {m.group(0)[:60]!r}')
    res += link_problems(site, page, dom, doms, failed)
    return res

# ---------------------------------------------------------------- the site, built once
NOTEBOOKS = build_docs.doc_notebooks()


def _build_site(dest):
    "Build the site into `dest`/_site, render every page with Chromium (DOM dump + screenshot); return the summary"
    site = dest/'_site'
    pages, failed = build_docs.build(site, quiet=True, keep_going=True)
    if SHOTS.exists(): shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    (dest/'dom').mkdir()
    def render(p):
        page, stem = p['page'], p['page'].replace('/', '_')[:-5]
        (dest/'dom'/f'{stem}.html').write_text(dump_dom(site/page))
        return page, str(dest/'dom'/f'{stem}.html'), str(screenshot(site/page, SHOTS/f'{stem}.png'))
    with ThreadPoolExecutor(2) as ex: rendered = list(ex.map(render, pages))
    kept = [png for page, _, png in rendered if page in KEEP_SHOTS]
    print(f"\nbuilt {len(pages)} pages in {site}; screenshots in {SHOTS}: " + ', '.join(kept))
    return dict(site=str(site), failed=failed, pages={page: dict(dom=dom, shot=png) for page, dom, png in rendered})

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The docs site, built once per test run (shared by pytest-xdist workers)"
    with shared_dir(tmp_path_factory, 'docs') as (d, done):
        if not done:
            if d.exists(): shutil.rmtree(d)
            d.mkdir()
            (d/'site.json').write_text(json.dumps(_build_site(d)))
            (d/'.done').touch()
        info = json.loads((d/'site.json').read_text())
    doms = {page: Dom(Path(v['dom']).read_text()) for page, v in info['pages'].items()}
    shots = {page: Path(v['shot']) for page, v in info['pages'].items()}
    return dict(dest=Path(info['site']), pages=info['pages'], failed=info['failed'], doms=doms, shots=shots)

@pytest.mark.slow
@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_page(site, nb):
    page = build_docs.page_name(nb, nb.parent)
    if page in site['failed']: pytest.fail(site['failed'][page], pytrace=False)
    assert page in site['pages'], f'{nb.name} produced no page'
    probs = page_problems(site['dest'], page, nb, site['doms'][page], site['doms'], site['failed'])
    if (r := blank_reason(site['shots'][page])): probs.append(f'{page}: screenshot {r}')
    if probs: pytest.fail(f'{len(probs)} problems on {page}:\n' + '\n'.join(probs), pytrace=False)

class Nav(HTMLParser):
    "The sidebar of a rendered page: its groups in order, each (title, [(href, label, is current page)])"
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.groups, self._depth, self._in, self._a = [], 0, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get('class') or '').split()
        if tag == 'nav' and 'site-nav' in cls: self._depth = 1; return
        if not self._depth: return
        if tag in ('nav', 'div'): self._depth += 1
        if 'nav-group' in cls: self.groups.append(['', []])
        if 'nav-group-title' in cls: self._in = 'title'
        if tag == 'a' and 'site-brand' not in cls and a.get('href'):
            if not self.groups: self.groups.append(['', []])
            self._a = [a['href'], '', a.get('aria-current') == 'page']

    def handle_endtag(self, tag):
        if not self._depth: return
        if tag in ('nav', 'div'):
            self._depth -= 1
            self._in = None
        if tag == 'a' and self._a:
            self._a[1] = ' '.join(self._a[1].split())
            self.groups[-1][1].append(tuple(self._a)); self._a = None

    def handle_data(self, data):
        if self._a: self._a[1] += data
        elif self._in == 'title': self.groups[-1][0] += data

def nav_problems(page, nav, want, first=None):
    "How the sidebar `nav` of `page` differs from `want` ([(group, [page])]); `first` must be among the first three links"
    res = []
    got = [(g.strip(), [h for h, _, _ in links]) for g, links in nav]
    names, want_names = [g for g, _ in got], [g for g, _ in want]
    if names != want_names: res.append(f'{page}: groups are {names}, expected {want_names}')
    for (g, hrefs), (wg, wp) in zip(got, want):
        if hrefs != wp: res.append(f'{page}: group {wg!r} links {hrefs}, expected {wp}')
    links = [h for _, hs in got for h in hs]
    res += [f'{page}: {h} is linked {links.count(h)} times' for h in sorted(set(links)) if links.count(h) > 1]
    current = [h for _, ls in nav for h, _, cur in ls if cur]
    if current != [page]: res.append(f'{page}: the sidebar marks {current} as the current page')
    if first and first not in links[:3]: res.append(f'{page}: {first} is not among the first three links {links[:3]}')
    return res

def expected_nav(built):
    "sidebar.yml's groups as pages: [(title, [page])], keeping only the pages that were `built`"
    nbs = build_docs.get_cfg().nbs_path
    res = [(t, [build_docs.page_name(nbs/f, nbs) for f, _ in entries]) for t, entries in build_docs.sidebar_groups(nbs)]
    return [(t, [p for p in ps if p in built]) for t, ps in res if any(p in built for p in ps)]

def test_sidebar_lists_every_notebook():
    "sidebar.yml names every notebook of nbs/ exactly once, each inside a group"
    nbs = build_docs.get_cfg().nbs_path
    groups = build_docs.sidebar_groups(nbs)
    listed = [f for _, entries in groups for f, _ in entries]
    assert all(t for t, _ in groups), f'sidebar.yml: pages outside a section: {[e for t, e in groups if not t]}'
    assert not (dup := sorted({f for f in listed if listed.count(f) > 1})), f'sidebar.yml lists {dup} more than once'
    have = {p.relative_to(nbs).as_posix() for p in NOTEBOOKS}
    assert not (missing := sorted(have - set(listed))), f'sidebar.yml does not list {missing}'
    assert not (extra := sorted(set(listed) - have)), f'sidebar.yml lists {extra}, which are not notebooks in {nbs}'

def test_nbdev_keeps_the_sidebar():
    "nbdev_docs regenerates sidebar.yml as one flat list unless settings.ini says `custom_sidebar = True`"
    assert build_docs.get_cfg().custom_sidebar, ('settings.ini needs `custom_sidebar = True`, else nbdev_docs '
                                                 'overwrites sidebar.yml')

@pytest.mark.slow
def test_site_navigation(site):
    "Every page's sidebar links every page once, in its sidebar.yml group and order, tutorial first; screenshots kept"
    pages = set(site['pages'])
    want = expected_nav(pages)
    assert sorted(p for _, ps in want for p in ps) == sorted(pages), 'sidebar.yml does not group every built page'
    navs = {page: Nav(Path(site['pages'][page]['dom']).read_text()).groups for page in sorted(pages)}
    probs = [pr for page, nav in navs.items() for pr in nav_problems(page, nav, want, first='tutorial.html')]
    assert not probs, f'{len(probs)} navigation problems:\n' + '\n'.join(probs)
    for p in KEEP_SHOTS:
        if p in pages: assert site['shots'][p].exists() and site['shots'][p].parent == SHOTS
    kept = ', '.join(str(site['shots'][p]) for p in KEEP_SHOTS if p in pages)
    print(f'screenshots kept: {kept}')
    # a warning is the one channel pytest shows under -q and pytest-xdist alike: name the files for the reader
    warnings.warn(f'[info] {len(pages)} docs pages checked; screenshots in {SHOTS} (core, learner: {kept})')

def test_nav_check_sees_mistakes():
    "The check itself: a page in the wrong group, a page linked twice, no current page, and the tutorial too far down"
    html = ('<nav class="site-nav"><a class="site-brand" href="index.html">x</a>'
            '<div class="nav-group"><div class="nav-group-title">Start</div><ul><li><a href="index.html">Home</a></li>'
            '<li><a href="b.html">B</a></li><li><a href="c.html">C</a></li></ul></div>'
            '<div class="nav-group"><div class="nav-group-title">More</div><ul><li><a href="t.html">T</a></li>'
            '<li><a href="b.html">B</a></li></ul></div></nav><h1>Page</h1><a href="z.html">z</a>')
    nav = Nav(html).groups
    assert [(g, [h for h, _, _ in ls]) for g, ls in nav] == [('Start', ['index.html', 'b.html', 'c.html']),
                                                             ('More', ['t.html', 'b.html'])]
    want = [('Start', ['index.html', 't.html']), ('More', ['b.html', 'c.html'])]
    probs = nav_problems('c.html', nav, want, first='t.html')
    assert len(probs) == 5, probs
    good = Nav(html.replace('<li><a href="b.html">B</a></li></ul></div></nav>', '</ul></div></nav>')
               .replace('href="c.html"', 'href="c.html" aria-current="page"')).groups
    assert nav_problems('c.html', good, [('Start', ['index.html', 'b.html', 'c.html']), ('More', ['t.html'])]) == []

# ---------------------------------------------------------------- titles and subtitles, whole
_CUT_WORDS = {'a', 'an', 'the', 'and', 'or', 'of', 'to', 'in', 'on', 'for', 'with', 'by', 'from', 'its', 'their', 'as',
              'at'}

def front_matter(nb_path):
    "(title, subtitle lines) of a notebook's first markdown cell: its `# Title` and its `> ` lines"
    nb = json.loads(Path(nb_path).read_text())
    md = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    m = re.search(r'^#\s+(.+?)\s*$', md, re.M)
    return (m.group(1) if m else ''), [l[1:].strip() for l in md.splitlines() if l.startswith('>')]

def subtitle_problems(name, title, lines):
    "What makes a page's title or subtitle not whole: missing, split over lines (nbdev keeps only the first), or cut"
    if not title: return [f'{name}: no `# Title` in the first markdown cell']
    if not lines or not lines[0]: return [f'{name}: no `> subtitle` in the first markdown cell']
    if len(lines) > 1:
        return [f'{name}: the subtitle spans {len(lines)} `>` lines; nbdev keeps only the first: {lines[0]!r}']
    s, res = lines[0], []
    words = re.findall(r"[\w']+", s.lower())
    if s[-1] in ',;:-(/' or (words and words[-1] in _CUT_WORDS and not s.endswith('`')):
        res.append(f'{name}: the subtitle ends mid-sentence: {s!r}')
    if s.count('`') % 2: res.append(f'{name}: the subtitle has an unclosed backtick: {s!r}')
    if s.count('(') != s.count(')'): res.append(f'{name}: the subtitle has an unclosed parenthesis: {s!r}')
    return res

def test_front_matter_is_whole():
    "Every notebook has a `# Title` and a one-line `> subtitle` that is not cut mid-sentence"
    probs = [p for nb in NOTEBOOKS for p in subtitle_problems(nb.name, *front_matter(nb))]
    assert not probs, '\n'.join(probs)

def test_subtitle_check_sees_cuts():
    "The check itself: a subtitle cut after 'in', after a comma, with an open parenthesis or backtick, or on two lines"
    assert subtitle_problems('x', 'T', ['Train a model, save and load']) == []
    assert subtitle_problems('x', 'T', ['Everything at once: `from fastcb.all import *`']) == []
    for cut in (['metrics on the logits, predictions in'], ['one, two,'], ['the loop (and more'], ['call `fit'],
                ['the state of'], ['first line', 'second line'], [''], []):
        assert subtitle_problems('x', 'T', cut), cut
    assert subtitle_problems('x', '', ['fine'])

def _plain(s):
    "Text as a reader sees it: no markdown backticks, pandoc's typographic quotes and dashes undone, spaces collapsed"
    s = s.replace('`', '')
    for a, b in (('\u2019', "'"), ('\u2018', "'"), ('\u201c', '"'), ('\u201d', '"'), ('\u2014', '---'), ('\u2013', '--'),
                 ('\u2026', '...')):
        s = s.replace(a, b)
    return ' '.join(s.split())

def shown_subtitle(dom_html):
    "The subtitle the rendered page shows under its title, as plain text"
    import html as _html
    m = re.search(r'<p class="subtitle"[^>]*>(.*?)</p>', dom_html, re.S)
    return _plain(_html.unescape(re.sub(r'<[^>]+>', '', m.group(1)))) if m else None

@pytest.mark.slow
def test_pages_show_whole_subtitle(site):
    "The built page shows the notebook's whole `> subtitle` under its title"
    probs = []
    for nb in NOTEBOOKS:
        page = build_docs.page_name(nb, nb.parent)
        if page not in site['pages']: continue
        want = _plain(' '.join(front_matter(nb)[1]))
        got = shown_subtitle(Path(site['pages'][page]['dom']).read_text())
        if got != want: probs.append(f'{page}: shows subtitle {got!r}, the notebook has {want!r}')
    assert not probs, '\n'.join(probs)

@pytest.mark.slow
def test_broken_link_is_reported(tmp_path):
    "The link check fails naming the page and the link for a missing page, a missing anchor and a missing image"
    (tmp_path/'a.html').write_text('<html><head><title>a</title></head><body><h1 id="top">A</h1>'
                                   '<a href="b.html#there">ok</a> <a href="#top">ok</a> <a href="b.html#nowhere">x</a>'
                                   '<a href="missing.html">y</a><img src="figs/none.png"></body></html>')
    (tmp_path/'b.html').write_text('<html><head><title>b</title></head><body><h2 id="there">B</h2></body></html>')
    doms = {p: Dom(dump_dom(tmp_path/p)) for p in ('a.html', 'b.html')}
    probs = link_problems(tmp_path, 'a.html', doms['a.html'], doms)
    assert len(probs) == 3, probs
    assert any(p.startswith('a.html: b.html#nowhere') for p in probs), probs
    assert any(p.startswith('a.html: missing.html') for p in probs), probs
    assert any(p.startswith('a.html: figs/none.png') for p in probs), probs
    assert link_problems(tmp_path, 'b.html', doms['b.html'], doms) == []

# ---------------------------------------------------------------- the Learner page as a reference
LEARNER_API = ['Learner', 'fit', 'validate', 'get_preds', 'add_cb', 'remove_cb', 'one_batch', 'show_training_loop', 'save',
               'load', 'freeze', 'unfreeze', 'predict', 'to']

def reference_problems(dom, cls, names):
    "What the page lacks for each of `names` (methods of `cls`, or `cls` itself): a section, a signature, its parameters"
    from fastcore.docments import docments
    res = []
    for n in names:
        f = cls if n == cls.__name__ else getattr(cls, n)
        i = dom.heading(n.lower() if f is cls else f'{cls.__name__.lower()}.{n.lower()}')
        if i is None: res.append(f'no reference section for {n}'); continue
        code = re.sub(r'\[(`[^`]*`)\]\([^)]*\)', r'\1', dom.section_code(i))  # names nbdev linked: as written
        if not re.search(rf'\b{re.escape(n)}\s*\(', code): res.append(f'the section of {n} shows no signature'); continue
        docs = docments(f.__init__ if f is cls else f)
        for p,doc in docs.items():
            if p in ('self', 'return'): continue
            if not re.search(rf'\b{p}\b', code): res.append(f'{n}: parameter {p} is not in the signature shown')
            elif doc and doc not in code and doc not in ''.join(dom.prose): res.append(f'{n}: parameter {p} is shown without its doc {doc!r}')
    return res

def empty_sections(dom):
    "Headings followed by nothing before the next heading of the same or a higher level"
    return [b[4].strip() for i,b in enumerate(dom.blocks) if b[0] == 'h' and not dom.section(i)]

@pytest.mark.slow
def test_learner_page_is_a_reference(site):
    "The Learner page documents the class and its main methods with signature and parameters, and has no empty section"
    from fastcb.learner import Learner
    page = 'learner.html'
    assert page in site['doms'], site['failed'].get(page, 'no learner page')
    dom = site['doms'][page]
    probs = reference_problems(dom, Learner, LEARNER_API) + [f'empty section {h!r}' for h in empty_sections(dom)]
    assert not probs, f'{page}: ' + '; '.join(probs)

def test_reference_check_sees_gaps():
    "The check itself: a method without a section, a parameter left out, and an empty section are reported"
    class A:
        def f(self, x:int, # The x
              y=2): # The y
            "Do f"
    dom = Dom('<html><body><h2 id="s">S</h2><h3 id="a.f">A.f</h3><pre>f(x:int, # The x\n)</pre>'
              '<h2 id="empty">Empty</h2><h2 id="end">End</h2><p>text</p></body></html>')
    assert reference_problems(dom, A, ['f']) == ['f: parameter y is not in the signature shown']
    assert reference_problems(dom, A, ['g']) if hasattr(A, 'g') else True
    assert empty_sections(dom) == ['Empty']
