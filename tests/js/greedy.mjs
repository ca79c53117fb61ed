// Greedy decoding of one gpt2deploy graph with onnxruntime-node, driven as transformers.js drives an
// Optimum decoder: the prompt step with empty past tensors [1, heads, 0, head_dim], then one token per step,
// each step's present (past P -> present P + S) fed back as the next past.
// Usage: node greedy.mjs PACKAGE_DIR GRAPH_FILE PROMPT_IDS_JSON NEW_TOKENS -> prints {"tokens": [...], ...}
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const require = createRequire(process.env.ORT_NODE_PREFIX ? join(process.env.ORT_NODE_PREFIX, "x.js") : import.meta.url);
const ort = require("onnxruntime-node");

const [pkgDir, graphFile, promptJson, newTokens] = process.argv.slice(2);
const manifest = JSON.parse(readFileSync(join(pkgDir, "manifest.json"), "utf8"));
const { n_layer: layers, n_head: heads, head_dim: headDim } = manifest.model;
const session = await ort.InferenceSession.create(join(pkgDir, graphFile), { executionProviders: ["cpu"] });

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), dims);
let past = {};
for (let i = 0; i < layers; i++) {
  for (const kind of ["key", "value"]) {
    past[`past_key_values.${i}.${kind}`] = new ort.Tensor("float32", new Float32Array(0), [1, heads, 0, headDim]);
  }
}
let ids = JSON.parse(promptJson);
let pastLength = 0;
const tokens = [];
const shapes = [];
for (let step = 0; step < Number(newTokens); step++) {
  const seq = ids.length;
  const feeds = {
    input_ids: int64(ids, [1, seq]),
    attention_mask: int64(new Array(pastLength + seq).fill(1), [1, pastLength + seq]),
    position_ids: int64(Array.from({ length: seq }, (_, k) => pastLength + k), [1, seq]),
    ...past,
  };
  const out = await session.run(feeds);
  const logits = out.logits;
  const vocab = logits.dims[2];
  const last = logits.data.subarray((seq - 1) * vocab, seq * vocab);
  let best = 0;
  for (let v = 1; v < vocab; v++) if (last[v] > last[best]) best = v;
  tokens.push(best);
  const next = {};
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) next[`past_key_values.${i}.${kind}`] = out[`present.${i}.${kind}`];
  }
  shapes.push(out["present.0.key"].dims);
  past = next;
  pastLength += seq;
  ids = [best];
}
process.stdout.write(JSON.stringify({ tokens, present_shapes: shapes, version: ort.env.versions?.common ?? null }) + "\n");
