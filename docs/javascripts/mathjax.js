// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself is served
// by the site (assets/mathjax/tex-svg.js, see docs/_hooks/offline_math.py): SVG output,
// so no web fonts are needed.
window.MathJax = {
  // textmacros: \_ and friends inside \text{} / \texttt{}
  loader: { load: ["[tex]/textmacros"] },
  tex: {
    packages: { "[+]": ["textmacros"] },
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: {
    fontCache: "global",
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material's instant navigation swaps the page without reloading it: typeset again.
document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
