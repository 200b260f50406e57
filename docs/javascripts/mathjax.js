// Pages use arithmatex's \( \) and \[ \]; tutorial notebooks use $ $ and $$ $$: typeset both, everywhere.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  }
};
