// Builds a workflow in the real ComfyUI frontend from a small spec and returns what the
// frontend itself writes: the UI workflow (graph.serialize(), as "Save" stores it) and the
// API prompt (app.graphToPrompt().output, as "Queue" sends it). Run with page.evaluate(src, spec).
//
// spec = {id: "<uuid>", nodes: [{id, type, pos, size?, title?, widgets: {name: value}}],
//         links: [[from_id, from_slot, to_id, to_input_name]], ds: {scale, offset}}
async (spec) => {
  // Frontend 1.49 names the control widget of an input whose control_after_generate default is
  // a string ("fixed", as core's PrimitiveInt in ComfyUI 0.33) after that value, not after the option.
  const findWidget = (node, name) => {
    const widgets = node.widgets || [];
    const named = widgets.find((w) => w.name === name);
    if (named || name !== "control_after_generate") return named;
    return widgets.find((w) => w.type === "combo" && (w.options?.values || []).includes("randomize"));
  };
  const graph = app.graph;
  graph.clear();
  const byId = {};
  for (const s of spec.nodes) {
    const node = LiteGraph.createNode(s.type);
    if (!node) throw new Error(`unknown node type ${s.type}`);
    node.id = s.id;
    graph.add(node);
    node.pos = [...s.pos];
    if (s.title) node.title = s.title;
    for (const [name, value] of Object.entries(s.widgets || {})) {
      const widget = findWidget(node, name);
      if (!widget) throw new Error(`${s.type} #${s.id} has no widget ${name}`);
      widget.value = value;
    }
    const auto = node.computeSize();
    node.setSize(s.size ? [Math.max(s.size[0], auto[0]), Math.max(s.size[1], auto[1])] : auto);
    byId[s.id] = node;
  }
  for (const [from, slot, to, inputName] of spec.links) {
    const target = byId[to];
    const index = target.findInputSlot(inputName);
    if (index < 0) throw new Error(`${target.type} #${to} has no input ${inputName}`);
    if (!byId[from].connect(slot, target, index)) throw new Error(`cannot link #${from}:${slot} -> #${to}.${inputName}`);
  }
  graph.id = spec.id;
  // The saved view (extra.ds) is the canvas's: show the whole graph when the file is opened.
  app.canvas.ds.scale = spec.ds.scale;
  app.canvas.ds.offset = [...spec.ds.offset];
  graph.extra = { ...(graph.extra || {}), frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ };
  // JSON round trip: drops undefined fields, as saving to a file does.
  const workflow = JSON.parse(JSON.stringify(graph.serialize()));
  const prompt = await app.graphToPrompt();
  return { workflow, api: JSON.parse(JSON.stringify(prompt.output)) };
}
