// The chapter list and the page contents open on every screen.
// sphinx-book-theme 1.3 adds its own .primary-toggle and .secondary-toggle buttons to the article
// header, beside pydata-sphinx-theme's in its navbar (hidden here). Both themes bind their click
// handlers to the first such button of the page only, the hidden one, so the visible buttons did
// nothing. Each other button now hands its clicks to the first one.
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of ["primary", "secondary"]) {
    const [first, ...others] = document.querySelectorAll(`.${kind}-toggle`);
    others.forEach((button) => button.addEventListener("click", (event) => {
      event.preventDefault();
      event.stopPropagation();
      first.click();
    }));
  }
});
