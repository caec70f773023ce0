// Runs against a live API (FLEET_API_URL, FLEET_API_KEY) with a worker behind it:
// tests/integration/test_typescript_client.py starts both and runs `npm test`.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createFleetClient, followEvents } from "../src/index.js";

const baseUrl = process.env.FLEET_API_URL ?? "";
const apiKey = process.env.FLEET_API_KEY ?? "";
const fleet = createFleetClient(baseUrl, apiKey);

test("submit, follow the events until done, fetch the output", async () => {
  const submitted = await fleet.POST("/v1/jobs", {
    body: { kind: "text-to-image", model: "z-image-turbo", prompt: "a fox", width: 64, height: 80, steps: 2 },
  });
  assert.equal(submitted.response.status, 201, JSON.stringify(submitted.error));
  const jobId = submitted.data!.id;

  const names: string[] = [];
  for await (const event of followEvents(baseUrl, apiKey, jobId)) {
    assert.equal(event.data.job_id, jobId);
    names.push(event.event);
  }
  assert.equal(names[0], "queued");
  assert.ok(names.includes("progress"), names.join(","));
  assert.equal(names.at(-1), "succeeded");

  const { data: job } = await fleet.GET("/v1/jobs/{job_id}", { params: { path: { job_id: jobId } } });
  assert.equal(job!.status, "succeeded");
  assert.deepEqual(job!.progress, { step: 2, total: 2, stage: null }); // denoising steps name no stage
  const url = job!.outputs[0].url; // every output the API hands out carries its presigned URL
  assert.ok(url);
  const download = await fetch(url!);
  assert.equal(download.status, 200);
  const bytes = new Uint8Array(await download.arrayBuffer());
  assert.deepEqual([...bytes.slice(1, 4)], [0x50, 0x4e, 0x47]); // "PNG"

  // The tenant's usage counts the job: its GPU time and its output.
  const { data: usage, response } = await fleet.GET("/v1/usage");
  assert.equal(response.status, 200);
  const row = usage!.rows.find((r) => r.model === "z-image-turbo" && r.status === "succeeded");
  assert.ok(row && row.jobs >= 1 && row.gpu_s > 0 && row.outputs >= 1, JSON.stringify(usage));
  assert.equal(usage!.totals.output_bytes >= job!.outputs[0].size_bytes, true);
});

test("a refused request names its field and queues nothing", async () => {
  const refused = await fleet.POST("/v1/jobs", {
    body: { kind: "text-to-image", model: "z-image-turbo", prompt: "a fox", width: 65, height: 80 },
  });
  assert.equal(refused.response.status, 422);
  assert.deepEqual(
    (refused.error as { errors: { field: string }[] }).errors.map((e) => e.field),
    ["width"],
  );
});
