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
  stage.onwheel = (event) => {
    if (!data.volume) return;
    event.preventDefault();
    send({ kind: "slice", delta: event.deltaY > 0 ? 1 : -1 });
  };
  stage.onkeydown = (event) => {
    if (!data.volume) return;
    const step = { ArrowDown: 1, ArrowRight: 1, PageDown: 5, ArrowUp: -1, ArrowLeft: -1, PageUp: -5 }[event.key];
    if (step) {
      event.preventDefault();
      send({ kind: "slice", delta: step });
    }
  };
  img.onload = () => { fit(); ctx.clearRect(0, 0, canvas.width, canvas.height); };
  if (img.complete) img.onload();
}
