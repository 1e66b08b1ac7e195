// Mask editor for reader annotation: a Streamlit Components v2 module, plain JS, no build step.
// Each layer's mask is a Uint8Array at the image's own resolution. Brush, eraser and polygon rasterise straight into
// it (pixel centres, no anti-aliasing), so Python receives exactly what the reader saw. The masks go to Python as
// 8-bit grey PNG data URLs when an edit ends (stroke end, polygon closed, undo, ...), never on pointer move.

const ZOOM_STEP = 1.5;
const MAX_ZOOM = 16;
const HISTORY_LIMIT = 50;
const OVERLAY_ALPHA = 0.45;
const CLOSE_RADIUS = 8; // screen px: clicking this near the first point closes the polygon
const SAME_POINT = 3; // screen px: a second click this near the last point adds nothing (double-click)

const editors = new WeakMap();

export default function maskCanvas({ data, parentElement, setStateValue }) {
  let editor = editors.get(parentElement);
  if (!editor) {
    editor = new MaskEditor(parentElement.querySelector(".mc-root"));
    editors.set(parentElement, editor);
  }
  editor.update(data, setStateValue);
  return () => {
    editor.destroy();
    editors.delete(parentElement);
  };
}

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the image could not be decoded"));
    image.src = url;
  });
}

class MaskEditor {
  constructor(root) {
    this.root = root;
    this.generation = 0;
    this.ready = false;
    this.layers = [];
    this.active = 0;
    this.tool = "brush";
    this.view = { zoom: 1, panX: 0, panY: 0 };
    this.fit = 1;
    this.poly = [];
    this.sending = Promise.resolve();
    this.buildDom();
    this.resizeObserver = new ResizeObserver(() => this.layout());
    this.resizeObserver.observe(root);
  }

  buildDom() {
    const button = (label, onclick, props = {}) =>
      element("button", { type: "button", "aria-label": label, title: label, text: label, onclick, ...props });
    this.toolButtons = {};
    for (const [tool, label, title] of [
      ["brush", "Brush", "Brush: paint the region"],
      ["eraser", "Eraser", "Eraser: remove from the region"],
      ["polygon", "Polygon", "Polygon: click the corners; click the first one, double-click or press Enter to close"],
      ["pan", "Pan", "Pan: drag the picture (or hold Space and drag)"],
    ]) {
      this.toolButtons[tool] = button(label, () => this.setTool(tool), { "aria-pressed": "false", title });
    }
    this.sizeInput = element("input", {
      type: "range", min: "1", max: "64", value: "8", "aria-label": "Brush size", title: "Brush size in image pixels",
      oninput: () => { this.sizeOutput.textContent = `${this.sizeInput.value} px`; this.render(); },
    });
    this.sizeOutput = element("output", { text: "8 px" });
    this.undoButton = button("Undo", () => this.undo(), { title: "Undo (Ctrl+Z)" });
    this.redoButton = button("Redo", () => this.redo(), { title: "Redo (Ctrl+Shift+Z)" });
    this.clearButton = button("Clear", () => this.clear(), { title: "Clear the active layer (undoable)" });
    this.noRegionButton = button("No region", () => this.markNoRegion(), {
      "aria-pressed": "false", title: "No region carries the diagnosis: clears every layer",
    });
    this.zoomLabel = element("output", { "aria-label": "Zoom level", text: "100%" });
    this.layerGroup = element("div", { class: "mc-group", role: "group", "aria-label": "Layer" });
    const group = (label, children) => element("div", { class: "mc-group", role: "group", "aria-label": label }, children);
    this.editControls = [
      ...["brush", "eraser", "polygon"].map((tool) => this.toolButtons[tool]),
      this.sizeInput, this.undoButton, this.redoButton, this.clearButton, this.noRegionButton,
    ];
    const toolbar = element("div", { class: "mc-toolbar", role: "toolbar", "aria-label": "Mask tools" }, [
      this.layerGroup,
      group("Tools", Object.values(this.toolButtons)),
      group("Brush size", [this.sizeInput, this.sizeOutput]),
      group("History", [this.undoButton, this.redoButton]),
      group("Zoom", [
        button("Zoom out", () => this.zoomBy(1 / ZOOM_STEP)),
        this.zoomLabel,
        button("Zoom in", () => this.zoomBy(ZOOM_STEP)),
        button("Fit", () => this.resetView(), { "aria-label": "Fit to view", title: "Fit to view" }),
      ]),
      group("Region", [this.clearButton, this.noRegionButton]),
    ]);
    this.canvas = element("canvas", {
      class: "mc-canvas", tabindex: "0", role: "application", "aria-label": "Mask drawing area", "data-ready": "false",
    });
    this.status = element("div", { class: "mc-status", role: "status", "aria-live": "polite" });
    this.root.replaceChildren(toolbar, element("div", { class: "mc-view" }, [this.canvas]), this.status);

    const on = (target, type, handler, options) => target.addEventListener(type, handler.bind(this), options);
    on(this.canvas, "pointerdown", this.onPointerDown);
    on(this.canvas, "pointermove", this.onPointerMove);
    on(this.canvas, "pointerup", this.onPointerUp);
    on(this.canvas, "pointercancel", this.onPointerUp);
    on(this.canvas, "pointerleave", () => { this.hover = null; this.render(); });
    on(this.canvas, "dblclick", () => this.closePolygon());
    on(this.canvas, "wheel", this.onWheel, { passive: false });
    on(this.root, "keydown", this.onKeyDown);
    on(this.root, "keyup", (event) => { if (event.key === " ") this.spaceDown = false; });
    on(this.canvas, "blur", () => { this.spaceDown = false; });
  }

  update(data, setStateValue) {
    this.setStateValue = setStateValue;
    this.disabled = Boolean(data.disabled);
    this.maxHeight = data.maxHeight;
    if (data.fingerprint !== this.fingerprint) {
      this.fingerprint = data.fingerprint;
      this.load(data);
    }
    this.layout();
    this.refresh();
  }

  async load(data) {
    const generation = ++this.generation;
    this.ready = false;
    this.canvas.dataset.ready = "false";
    const { width, height } = data;
    try {
      const image = await loadImage(data.image);
      const starts = {};
      for (const [name, url] of Object.entries(data.start)) starts[name] = await this.readMask(url, width, height);
      if (generation !== this.generation) return;
      this.image = image;
      this.width = width;
      this.height = height;
      this.layers = data.layers.map(({ name, colour }) => this.makeLayer(name, colour, starts[name]));
      this.active = 0;
      this.noRegion = Boolean(data.startNoRegion);
      this.version = 0;
      this.undoStack = [];
      this.redoStack = [];
      this.poly = [];
      this.view = { zoom: 1, panX: 0, panY: 0 };
      this.buildLayerButtons();
      this.ready = true;
      this.canvas.dataset.ready = "true";
      this.layout();
      this.refresh();
    } catch (error) {
      this.status.textContent = `The picture could not be shown: ${error.message}`;
    }
  }

  async readMask(url, width, height) {
    const image = await loadImage(url);
    const scratch = element("canvas", { width: String(width), height: String(height) });
    const context = scratch.getContext("2d", { willReadFrequently: true });
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, width, height).data;
    const mask = new Uint8Array(width * height);
    for (let i = 0; i < mask.length; i++) mask[i] = pixels[4 * i] > 127 ? 1 : 0;
    return mask;
  }

  makeLayer(name, colour, start) {
    const overlay = element("canvas", { width: String(this.width), height: String(this.height) });
    const rgb = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
    const layer = {
      name, colour, rgb, overlay,
      mask: start || new Uint8Array(this.width * this.height),
      context: overlay.getContext("2d"),
      pixels: new ImageData(this.width, this.height),
    };
    this.paintOverlay(layer);
    return layer;
  }

  buildLayerButtons() {
    this.layerButtons = this.layers.map((layer, index) =>
      element("button", {
        type: "button", "aria-label": `Layer ${layer.name}`, title: `Draw on the ${layer.name} layer`,
        "aria-pressed": "false", style: `--mc-layer: ${layer.colour}`, text: layer.name,
        onclick: () => { this.active = index; this.refresh(); },
      }),
    );
    this.layerGroup.replaceChildren(...(this.layers.length > 1 ? this.layerButtons : []));
    this.layerGroup.hidden = this.layers.length < 2;
  }

  destroy() {
    this.generation++;
    this.resizeObserver.disconnect();
    this.root.replaceChildren();
  }

  // --- view -------------------------------------------------------------------------------------------------------

  layout() {
    if (!this.ready) return;
    const available = Math.max(this.root.clientWidth, 100);
    const fit = Math.min(available / this.width, this.maxHeight / this.height);
    if (fit !== this.fit) {
      this.view.panX *= fit / this.fit;
      this.view.panY *= fit / this.fit;
      this.fit = fit;
    }
    this.cssWidth = Math.round(this.width * fit);
    this.cssHeight = Math.round(this.height * fit);
    const ratio = window.devicePixelRatio || 1;
    this.canvas.style.width = `${this.cssWidth}px`;
    this.canvas.style.height = `${this.cssHeight}px`;
    this.canvas.width = Math.round(this.cssWidth * ratio);
    this.canvas.height = Math.round(this.cssHeight * ratio);
    this.render();
  }

  get scale() {
    return (this.cssWidth / this.width) * this.view.zoom;
  }

  screenPoint(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: event.clientX - box.left, y: event.clientY - box.top };
  }

  toImage({ x, y }) {
    return { x: (x - this.view.panX) / this.scale, y: (y - this.view.panY) / this.scale };
  }

  toScreen({ x, y }) {
    return { x: x * this.scale + this.view.panX, y: y * this.scale + this.view.panY };
  }

  zoomAt(point, factor) {
    const zoom = Math.min(MAX_ZOOM, Math.max(1, this.view.zoom * factor));
    const k = zoom / this.view.zoom;
    this.view = { zoom, panX: point.x - (point.x - this.view.panX) * k, panY: point.y - (point.y - this.view.panY) * k };
    this.clampPan();
  }

  zoomBy(factor) {
    if (this.ready) this.zoomAt({ x: this.cssWidth / 2, y: this.cssHeight / 2 }, factor);
  }

  resetView() {
    this.view = { zoom: 1, panX: 0, panY: 0 };
    this.refresh();
  }

  clampPan() {
    const { zoom } = this.view;
    this.view.panX = Math.min(0, Math.max(this.cssWidth * (1 - zoom), this.view.panX));
    this.view.panY = Math.min(0, Math.max(this.cssHeight * (1 - zoom), this.view.panY));
    this.refresh();
  }

  // --- drawing ----------------------------------------------------------------------------------------------------

  get brushRadius() {
    return Math.max(Number(this.sizeInput.value) / 2, 0.75);
  }

  // Sets (or, erasing, clears) every pixel whose centre is within the brush radius of segment a-b; returns the
  // rectangle it may have changed.
  paintSegment(mask, a, b, value) {
    const r = this.brushRadius;
    const { width, height } = this;
    const x0 = Math.max(0, Math.floor(Math.min(a.x, b.x) - r));
    const x1 = Math.min(width - 1, Math.ceil(Math.max(a.x, b.x) + r));
    const y0 = Math.max(0, Math.floor(Math.min(a.y, b.y) - r));
    const y1 = Math.min(height - 1, Math.ceil(Math.max(a.y, b.y) + r));
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const length2 = dx * dx + dy * dy;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const px = x + 0.5 - a.x;
        const py = y + 0.5 - a.y;
        const t = length2 > 0 ? Math.min(1, Math.max(0, (px * dx + py * dy) / length2)) : 0;
        const ex = px - t * dx;
        const ey = py - t * dy;
        if (ex * ex + ey * ey <= r * r) mask[y * width + x] = value;
      }
    }
    return { x0, y0, x1, y1 };
  }

  fillPolygon(mask, points) {
    const { width, height } = this;
    const ys = points.map((p) => p.y);
    const y0 = Math.max(0, Math.floor(Math.min(...ys)));
    const y1 = Math.min(height - 1, Math.ceil(Math.max(...ys)));
    for (let y = y0; y <= y1; y++) {
      const cy = y + 0.5;
      const crossings = [];
      points.forEach((a, i) => {
        const b = points[(i + 1) % points.length];
        if (a.y <= cy !== b.y <= cy) crossings.push(a.x + ((cy - a.y) * (b.x - a.x)) / (b.y - a.y));
      });
      crossings.sort((p, q) => p - q);
      for (let k = 0; k + 1 < crossings.length; k += 2) {
        const from = Math.max(0, Math.ceil(crossings[k] - 0.5));
        const to = Math.min(width - 1, Math.floor(crossings[k + 1] - 0.5));
        if (from <= to) mask.fill(1, y * width + from, y * width + to + 1);
      }
    }
  }

  // Copies the mask into the layer's coloured overlay, within a rectangle (a brush segment) or whole.
  paintOverlay(layer, { x0, y0, x1, y1 } = { x0: 0, y0: 0, x1: this.width - 1, y1: this.height - 1 }) {
    if (x1 < x0 || y1 < y0) return;
    const { pixels, mask, rgb } = layer;
    const rgba = pixels.data;
    for (let y = y0; y <= y1; y++) {
      for (let i = y * this.width + x0; i <= y * this.width + x1; i++) {
        rgba[4 * i] = rgb[0];
        rgba[4 * i + 1] = rgb[1];
        rgba[4 * i + 2] = rgb[2];
        rgba[4 * i + 3] = mask[i] ? 255 : 0;
      }
    }
    layer.context.putImageData(pixels, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
  }

  get editable() {
    return this.ready && !this.disabled;
  }

  onPointerDown(event) {
    if (!this.ready) return;
    this.canvas.focus();
    const point = this.screenPoint(event);
    if (event.button === 1 || (event.button === 0 && (this.tool === "pan" || this.spaceDown))) {
      this.drag = { start: point, panX: this.view.panX, panY: this.view.panY };
      this.canvas.setPointerCapture(event.pointerId);
      event.preventDefault();
      return;
    }
    if (event.button !== 0 || !this.editable) return;
    if (this.tool === "polygon") {
      this.addPolygonPoint(point);
      return;
    }
    const layer = this.layers[this.active];
    const at = this.toImage(point);
    this.stroke = { layer, before: layer.mask.slice(), last: at, value: this.tool === "brush" ? 1 : 0 };
    this.paintOverlay(layer, this.paintSegment(layer.mask, at, at, this.stroke.value));
    this.canvas.setPointerCapture(event.pointerId);
    this.render();
  }

  onPointerMove(event) {
    const point = this.screenPoint(event);
    this.hover = point;
    if (this.drag) {
      this.view.panX = this.drag.panX + point.x - this.drag.start.x;
      this.view.panY = this.drag.panY + point.y - this.drag.start.y;
      this.clampPan();
      return;
    }
    if (this.stroke) {
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
      for (const each of events.length ? events : [event]) {
        const at = this.toImage(this.screenPoint(each));
        const changed = this.paintSegment(this.stroke.layer.mask, this.stroke.last, at, this.stroke.value);
        this.paintOverlay(this.stroke.layer, changed);
        this.stroke.last = at;
      }
    }
    this.render();
  }

  onPointerUp() {
    this.drag = null;
    const stroke = this.stroke;
    this.stroke = null;
    if (!stroke) return;
    const index = this.layers.indexOf(stroke.layer);
    const painted = stroke.value === 1;
    this.commit({ [index]: stroke.before }, painted ? false : this.noRegion);
  }

  // Polygon corners are kept in image coordinates, so zooming or panning halfway through keeps them in place.
  addPolygonPoint(point) {
    const near = (corner, distance) => {
      const at = this.toScreen(corner);
      return Math.hypot(point.x - at.x, point.y - at.y) <= distance;
    };
    if (this.poly.length >= 3 && near(this.poly[0], CLOSE_RADIUS)) {
      this.closePolygon();
      return;
    }
    const last = this.poly[this.poly.length - 1];
    if (!last || !near(last, SAME_POINT)) this.poly.push(this.toImage(point));
    this.refresh();
  }

  closePolygon() {
    if (this.tool !== "polygon" || this.poly.length < 3 || !this.editable) return;
    const layer = this.layers[this.active];
    const before = layer.mask.slice();
    this.fillPolygon(layer.mask, this.poly);
    this.poly = [];
    this.paintOverlay(layer);
    this.commit({ [this.active]: before }, false);
  }

  onWheel(event) {
    if (!this.ready) return;
    event.preventDefault();
    this.zoomAt(this.screenPoint(event), event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP);
  }

  onKeyDown(event) {
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && (key === "z" || key === "y")) {
      event.preventDefault();
      if (key === "y" || event.shiftKey) this.redo();
      else this.undo();
    } else if (event.key === " " && event.target === this.canvas) {
      event.preventDefault();
      this.spaceDown = true;
    } else if (event.key === "Enter" && event.target === this.canvas) {
      this.closePolygon();
    } else if (event.key === "Escape" && this.poly.length) {
      this.poly = [];
      this.refresh();
    }
  }

  setTool(tool) {
    this.tool = tool;
    this.poly = [];
    this.refresh();
  }

  // --- edits, history and sending ---------------------------------------------------------------------------------

  // An edit is recorded as the masks of the layers it touched, before and after, and the no-region flag.
  commit(before, noRegion) {
    const changed = Object.entries(before).filter(([index, mask]) => !sameMask(mask, this.layers[index].mask));
    if (!changed.length && noRegion === this.noRegion) return;
    const entry = { before: {}, after: {}, noRegionBefore: this.noRegion, noRegionAfter: noRegion };
    for (const [index, mask] of changed) {
      entry.before[index] = mask;
      entry.after[index] = this.layers[index].mask.slice();
    }
    this.undoStack.push(entry);
    if (this.undoStack.length > HISTORY_LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.noRegion = noRegion;
    this.edited();
  }

  apply(entry, side) {
    for (const [index, mask] of Object.entries(entry[side])) {
      this.layers[index].mask.set(mask);
      this.paintOverlay(this.layers[index]);
    }
    this.noRegion = side === "before" ? entry.noRegionBefore : entry.noRegionAfter;
    this.edited();
  }

  undo() {
    if (!this.editable || !this.undoStack.length) return;
    const entry = this.undoStack.pop();
    this.redoStack.push(entry);
    this.apply(entry, "before");
  }

  redo() {
    if (!this.editable || !this.redoStack.length) return;
    const entry = this.redoStack.pop();
    this.undoStack.push(entry);
    this.apply(entry, "after");
  }

  clear() {
    if (!this.editable) return;
    const layer = this.layers[this.active];
    const before = layer.mask.slice();
    layer.mask.fill(0);
    this.paintOverlay(layer);
    this.commit({ [this.active]: before }, this.noRegion);
  }

  markNoRegion() {
    if (!this.editable) return;
    const before = {};
    this.layers.forEach((layer, index) => {
      before[index] = layer.mask.slice();
      layer.mask.fill(0);
      this.paintOverlay(layer);
    });
    this.poly = [];
    this.commit(before, true);
  }

  edited() {
    this.version++;
    this.refresh();
    const snapshot = {
      fingerprint: this.fingerprint, version: this.version, noRegion: this.noRegion,
      masks: this.layers.map((layer) => [layer.name, layer.mask.slice()]),
    };
    const { width, height } = this;
    this.sending = this.sending
      .then(async () => {
        const masks = {};
        for (const [name, mask] of snapshot.masks) masks[name] = await encodePng(mask, width, height);
        if (snapshot.fingerprint !== this.fingerprint) return;
        this.setStateValue("drawing", {
          fingerprint: snapshot.fingerprint, version: snapshot.version, no_region: snapshot.noRegion, masks,
        });
      })
      .catch((error) => {
        this.status.textContent = `The drawing could not be sent: ${error.message}`;
      });
  }

  // --- rendering --------------------------------------------------------------------------------------------------

  refresh() {
    if (!this.ready) return;
    for (const [tool, node] of Object.entries(this.toolButtons)) node.setAttribute("aria-pressed", String(tool === this.tool));
    this.layerButtons.forEach((node, index) => node.setAttribute("aria-pressed", String(index === this.active)));
    for (const control of this.editControls) control.disabled = this.disabled;
    this.undoButton.disabled = this.disabled || !this.undoStack.length;
    this.redoButton.disabled = this.disabled || !this.redoStack.length;
    this.noRegionButton.setAttribute("aria-pressed", String(this.noRegion));
    this.zoomLabel.textContent = `${Math.round(this.view.zoom * 100)}%`;
    this.canvas.dataset.tool = this.tool;
    const polygonHint = this.poly.length
      ? `Polygon: ${this.poly.length} points; click the first point, double-click or press Enter to close.`
      : "";
    this.status.textContent = [this.noRegion ? "No region marked." : "", polygonHint].filter(Boolean).join(" ");
    this.render();
  }

  render() {
    if (!this.ready || this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.draw();
    });
  }

  draw() {
    const context = this.canvas.getContext("2d");
    const ratio = this.canvas.width / this.cssWidth;
    const scale = this.scale;
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    context.setTransform(ratio * scale, 0, 0, ratio * scale, ratio * this.view.panX, ratio * this.view.panY);
    context.imageSmoothingEnabled = this.view.zoom < 2;
    context.drawImage(this.image, 0, 0, this.width, this.height);
    context.imageSmoothingEnabled = false;
    context.globalAlpha = OVERLAY_ALPHA;
    for (const layer of this.layers) context.drawImage(layer.overlay, 0, 0);
    context.globalAlpha = 1;
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    const colour = this.layers[this.active].colour;
    if (this.poly.length) {
      const corners = this.poly.map((corner) => this.toScreen(corner));
      context.strokeStyle = colour;
      context.lineWidth = 2;
      context.beginPath();
      corners.forEach((p, i) => (i ? context.lineTo(p.x, p.y) : context.moveTo(p.x, p.y)));
      if (this.hover) context.lineTo(this.hover.x, this.hover.y);
      context.stroke();
      context.beginPath();
      context.arc(corners[0].x, corners[0].y, CLOSE_RADIUS, 0, 2 * Math.PI);
      context.stroke();
    }
    if (this.hover && (this.tool === "brush" || this.tool === "eraser") && this.editable) {
      context.strokeStyle = this.tool === "brush" ? colour : "#ffffff";
      context.lineWidth = 1;
      context.beginPath();
      context.arc(this.hover.x, this.hover.y, this.brushRadius * scale, 0, 2 * Math.PI);
      context.stroke();
    }
  }
}

function sameMask(a, b) {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// --- PNG: 8-bit grey, one IDAT, zlib through the browser's CompressionStream -------------------------------------

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, payload) {
  const out = new Uint8Array(12 + payload.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, payload.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(payload, 8);
  view.setUint32(8 + payload.length, crc32(out.subarray(4, 8 + payload.length)));
  return out;
}

async function encodePng(mask, width, height) {
  const rows = new Uint8Array((width + 1) * height); // each row: filter type 0, then one byte per pixel
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) rows[y * (width + 1) + 1 + x] = mask[y * width + x] ? 255 : 0;
  }
  const zlib = new Blob([rows]).stream().pipeThrough(new CompressionStream("deflate"));
  const idat = new Uint8Array(await new Response(zlib).arrayBuffer());
  const header = new Uint8Array(13);
  new DataView(header.buffer).setUint32(0, width);
  new DataView(header.buffer).setUint32(4, height);
  header[8] = 8; // bit depth; colour type 0 (grey), deflate, no filter, no interlace follow as zeros
  const signature = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);
  const parts = [signature, chunk("IHDR", header), chunk("IDAT", idat), chunk("IEND", new Uint8Array(0))];
  const bytes = new Uint8Array(await new Blob(parts).arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return `data:image/png;base64,${btoa(binary)}`;
}
