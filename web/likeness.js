// Likeness: small graph-editor helpers for this pack's nodes (served from WEB_DIRECTORY = "./web").
//  - Node colours per family (by category), so a workflow shows at a glance which part is Concat-ID,
//    StableAnimator, FantasyID, face analysis or geometry. A colour the user picks, saved in a workflow, wins.
//  - Identity Metrics shows its summary (similarity to the reference, inter-frame similarity, face motion,
//    frames without a face) as text on the node after a run; its plot is shown as the node's preview image.
import { app } from "../../scripts/app.js";

// title-bar / body colour pairs (LiteGraph's palette, so they sit well in the dark and light themes)
const PALETTE = {
  red: ["#322", "#533"],
  brown: ["#332922", "#593930"],
  green: ["#232", "#353"],
  blue: ["#223", "#335"],
  pale_blue: ["#2a363b", "#3f5159"],
  cyan: ["#233", "#355"],
  purple: ["#323", "#535"],
  yellow: ["#432", "#653"],
};
const FAMILY = {
  "Likeness/Face": "purple",
  "Likeness/Concat-ID": "blue",
  "Likeness/StableAnimator": "green",
  "Likeness/FantasyID": "brown",
  "Likeness/Geometry": "cyan",
  "Likeness/CogVideoX": "yellow",
  "Likeness/Sampling": "red",
  "Likeness/Setup": "pale_blue",
};
const SUMMARY = "likeness_summary";

function showSummary(node, text) {
  node.likenessSummary = text;
  let w = node.widgets?.find((w) => w.name === SUMMARY);
  if (!w) {
    const make = window.comfyAPI?.widgets?.ComfyWidgets?.STRING;
    if (make) {
      w = make(node, SUMMARY, ["STRING", { multiline: true }], app).widget;
    } else {
      w = node.addWidget("text", SUMMARY, "", () => {});
    }
    w.options = w.options || {};
    w.options.serialize = false; // not an input of the prompt
    w.options.getMinHeight = () => 84; // the four lines of the summary
    w.serialize = false; // nor saved in the workflow
    if (w.inputEl) {
      w.inputEl.readOnly = true;
      w.inputEl.style.opacity = 0.85;
    }
  }
  w.value = text;
  const want = node.computeSize();
  node.setSize([Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1] + 200)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "Likeness.NodeUI",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const colours = PALETTE[FAMILY[nodeData.category]];
    if (colours) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        [this.color, this.bgcolor] = colours;
        return r;
      };
    }
    if (nodeData.name === "LikenessIdentityMetrics") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        const r = onExecuted?.apply(this, arguments);
        // text[0] is the summary; text[1] the JSON table for API users, too long for the node
        const text = (output?.text || [])[0] || "";
        if (text) showSummary(this, text.split(/, |; /).join("\n"));
        return r;
      };
    }
  },
});
