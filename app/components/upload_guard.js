// Reports the files Streamlit's uploaders refused in the browser (too large, wrong type), which Streamlit shows
// only as a tooltip on the file chip: the page then shows each as an error (app/upload_guard.py).
// state "rejected": the refused chips' labels ("name, size"), sorted; updated whenever the page changes.
export default function (component) {
  const { setStateValue } = component;
  let last = null;
  const scan = () => {
    const chips = [...document.querySelectorAll('[data-testid="stFileChip"]')]
      .filter((chip) => chip.querySelector('[data-testid="stFileChipIconError"]'));
    const labels = chips.map((chip) => chip.getAttribute("aria-label")
      || chip.querySelector("[aria-label]")?.getAttribute("aria-label") || chip.innerText.trim()).sort();
    const key = JSON.stringify(labels);
    if (key !== last) {
      last = key;
      setStateValue("rejected", labels);
    }
  };
  const observer = new MutationObserver(scan);
  observer.observe(document.body, { subtree: true, childList: true });
  scan();
  return () => observer.disconnect();
}
