// Offline typesetting check for the built site, for a machine without Chromium (docs/scripts/screenshot_site.sh
// runs it then): opens each page in jsdom, runs its scripts with every load that is not a local file refused, waits
// for MathJax and counts the formulas typeset, MathJax errors and TeX left raw. Exit 1 on a MathJax error, raw TeX or a
// refused network load.
//   npm install --prefix /tmp/jsd jsdom@24 && NODE_PATH=/tmp/jsd/node_modules node docs/scripts/typeset_check.js SITE_DIR PAGE...
// (PAGE as in the URL: "" for Home, "concepts/", "tutorials/01_schedule_and_updates/"; about 30 s a page on 2 cores).
const { JSDOM, ResourceLoader, VirtualConsole } = require("jsdom");
const path = require("path");
const blocked = [];
class OfflineLoader extends ResourceLoader {
  fetch(url, options) {
    if (!url.startsWith("file:")) { blocked.push(url); return null; }
    return super.fetch(url, options);
  }
}
async function check(file) {
  const vc = new VirtualConsole();
  const errors = [];
  vc.on("jsdomError", (e) => errors.push(String(e.message || e).slice(0, 160)));
  const dom = await JSDOM.fromFile(file, {
    runScripts: "dangerously", resources: new OfflineLoader(), pretendToBeVisual: true, virtualConsole: vc,
    beforeParse(window) { window.matchMedia = window.matchMedia || (() => ({ matches: false, addListener() {}, removeListener() {}, addEventListener() {}, removeEventListener() {} })); },
  });
  const w = dom.window;
  await new Promise((r) => w.addEventListener("load", r));
  for (let i = 0; i < 200 && !(w.MathJax && w.MathJax.startup && w.MathJax.startup.promise); i++) await new Promise((r) => setTimeout(r, 50));
  if (!(w.MathJax && w.MathJax.startup && w.MathJax.startup.promise)) { console.log(file, "MathJax did not start", errors.slice(0, 3)); return false; }
  await w.MathJax.startup.promise;
  const doc = w.document;
  const n = doc.querySelectorAll("mjx-container").length;
  const merr = doc.querySelectorAll("mjx-merror, merror").length;
  const main = doc.querySelector(".md-content") || doc.body;
  // raw TeX left: arithmatex spans still holding \( or \[, and $...$ in notebook markdown
  const raw = [...doc.querySelectorAll(".arithmatex")].filter((el) => /\\\(|\\\[/.test(el.textContent)).length;
  const dollars = [...main.querySelectorAll(".jp-RenderedMarkdown p, .jp-RenderedMarkdown li, .jp-RenderedMarkdown h1, .jp-RenderedMarkdown h2, .jp-RenderedMarkdown h3, .jp-RenderedMarkdown td")].filter((el) => /\$[^$\s][^$]*\$/.test(el.textContent)).length;
  console.log(`${path.relative(process.argv[2], file)}: ${n} formulas typeset, ${merr} MathJax errors, ${raw + dollars} raw TeX left, ${blocked.length} network loads refused`);
  w.close();
  return merr === 0 && raw + dollars === 0 && blocked.length === 0;
}
(async () => {
  const site = process.argv[2];
  let ok = true;
  for (const page of process.argv.slice(3)) ok = (await check(path.join(site, page, "index.html"))) && ok;
  if (blocked.length) console.log("refused:", [...new Set(blocked)].slice(0, 10));
  process.exit(ok ? 0 : 1);
})();
