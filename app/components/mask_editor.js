// medseg mask editor: shows the rendered slice and reports what the user does on it, in slice pixels.
// Plain JS, no library, nothing fetched: Streamlit's components v2 mounts it in the page (see app/editor.py).
// The Python side applies every edit (app/editing.py) and sends the new picture; this only draws a stroke's preview.
//   data: {image: PNG data URL, rows, cols (slice pixels), tool: view|brush|eraser|fill|delete|prompt,
//          radius (slice px), color: "#rrggbb", volume: bool, label: text for screen readers}
//   trigger "edit": {kind: "stroke", points: [[x, y], ...], shift} | {kind: "click", x, y, shift}
//                   | {kind: "slice", delta: +-1}; every event carries a nonce so two equal clicks both count.
export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  let root = parentElement.querySelector(".medseg-editor");
  if (!root) {
    root = document.createElement("div");
    root.className = "medseg-editor";
    root.innerHTML = '<div class="stage"><img alt="" draggable="false"><canvas></canvas></div>';
    parentElement.appendChild(root);
  }
  const stage = root.querySelector(".stage");
  const img = root.querySelector("img");
  const canvas = root.querySelector("canvas");
  stage.tabIndex = 0;
  stage.setAttribute("role", "img");
  stage.setAttribute("aria-label", data.label || "mask editor");
  stage.dataset.tool = data.tool;
  stage.dataset.testid = "medsegEditor";
  if (img.getAttribute("src") !== data.image) img.setAttribute("src", data.image);

  const send = (value) => setTriggerValue("edit", { ...value, nonce: Date.now() + Math.random() });
  const toSlice = (event) => {
    const box = img.getBoundingClientRect();
    return [((event.clientX - box.left) / box.width) * data.cols - 0.5,
            ((event.clientY - box.top) / box.height) * data.rows - 0.5];
  };
  const ctx = canvas.getContext("2d");
  const fit = () => {
    canvas.width = img.clientWidth;
    canvas.height = img.clientHeight;
  };
  const dot = ([x, y]) => {
    const sx = canvas.width / data.cols;
    ctx.beginPath();
    ctx.arc((x + 0.5) * sx, (y + 0.5) * (canvas.height / data.rows), Math.max(1, data.radius * sx), 0, 2 * Math.PI);
    ctx.fill();
  };
  let stroke = null;

  // Handlers are replaced on every render, so they always see this render's tool and size.
  stage.onpointerdown = (event) => {
    if (event.button !== 0 || data.tool === "view") return;
    event.preventDefault();
    stage.focus();
    const point = toSlice(event);
    if (data.tool === "brush" || data.tool === "eraser") {
      fit();
      ctx.fillStyle = data.tool === "eraser" ? "rgba(0,0,0,0.55)" : data.color + "99";
      stroke = { points: [point], shift: event.shiftKey };
      stage.setPointerCapture(event.pointerId);
      dot(point);
    } else {
      send({ kind: "click", x: point[0], y: point[1], shift: event.shiftKey });
    }
  };
  stage.onpointermove = (event) => {
    if (!stroke) return;
    const point = toSlice(event);
    stroke.points.push(point);
    dot(point);
  };
  stage.onpointerup = () => {
    if (!stroke) return;
    const done = stroke;
    stroke = null;
    send({ kind: "stroke", points: done.points, shift: done.shift });
  };
  // Slice moves belong to the canvas alone: the wheel only while the pointer is over the image, keys only while
  // the canvas itself has the focus (a click or Tab gives it; a click anywhere else takes it away). Listeners sit
  // on the stage, never on the document or window, so the page scrolls and other widgets keep their keys. With
  // Ctrl/Meta/Alt the browser's own zoom and shortcuts win.
  stage.onwheel = (event) => {
    if (!data.volume || event.ctrlKey || event.metaKey || event.altKey || !stage.matches(":hover")) return;
    event.preventDefault();
    // One slice per mouse notch (~100 px); a trackpad's many small deltas add up to one slice per 50 px.
    const px = event.deltaMode === 1 ? event.deltaY * 33 : event.deltaMode === 2 ? event.deltaY * 800 : event.deltaY;
    root.wheelRest = (root.wheelRest || 0) + px;
    if (Math.abs(root.wheelRest) < 50) return;
    const delta = root.wheelRest > 0 ? 1 : -1;
    root.wheelRest = 0;
    send({ kind: "slice", delta });
  };
  stage.onkeydown = (event) => {
    if (!data.volume || event.target !== stage || event.ctrlKey || event.metaKey || event.altKey) return;
    const step = { ArrowDown: 1, ArrowRight: 1, PageDown: 5, ArrowUp: -1, ArrowLeft: -1, PageUp: -5 }[event.key];
    if (step) {
      event.preventDefault();
      event.stopPropagation();  // handled here: not also a page scroll or another listener's shortcut
      send({ kind: "slice", delta: step });
    }
  };
  stage.onpointerleave = () => { root.wheelRest = 0; };
  img.onload = () => { fit(); ctx.clearRect(0, 0, canvas.width, canvas.height); };
  if (img.complete) img.onload();
}
