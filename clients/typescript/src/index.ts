// A typed client of the fleet's HTTP API. The types (schema.d.ts) are generated from the API's
// OpenAPI document by `npm run generate`; the requests go through openapi-fetch.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type Job = components["schemas"]["JobOut"];
export type Usage = components["schemas"]["UsageOut"];
export type { components, paths };

/** One Server-Sent Event of GET /v1/jobs/{id}/events. */
export interface JobEvent {
  id: string;
  event: "queued" | "started" | "progress" | "succeeded" | "failed" | "canceled";
  data: { job_id: string; status: string; at: number; step?: number; total?: number; stage?: string };
}

export function createFleetClient(baseUrl: string, apiKey: string) {
  return createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${apiKey}` } });
}

/**
 * The job's live events until the stream ends (after the terminal event). Pass the last event's
 * id as `lastEventId` to resume after a dropped connection: every later event comes once.
 */
export async function* followEvents(
  baseUrl: string,
  apiKey: string,
  jobId: string,
  lastEventId?: string,
): AsyncGenerator<JobEvent> {
  const headers: Record<string, string> = { Authorization: `Bearer ${apiKey}` };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await fetch(`${baseUrl}/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers });
  if (!response.ok || !response.body) {
    throw new Error(`events of job ${jobId}: HTTP ${response.status} ${await response.text()}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (event) yield event;
    }
  }
}

function parseEvent(block: string): JobEvent | undefined {
  const fields: Record<string, string> = {};
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // keepalive comment
    const colon = line.indexOf(":");
    fields[line.slice(0, colon)] = line.slice(colon + 1).replace(/^ /, "");
  }
  if (!fields.data) return undefined;
  return { id: fields.id, event: fields.event as JobEvent["event"], data: JSON.parse(fields.data) };
}
