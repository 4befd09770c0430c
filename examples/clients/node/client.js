#!/usr/bin/env node
// A shoal client in Node: @grpc/grpc-js + @grpc/proto-loader, loading the .proto at run time.
//
//   npm ci && node client.js [--target 127.0.0.1:50051] [--prompt-token-ids 1,2,3] [--max-new-tokens 8]
//
// It does five things and prints one line each (tests/test_clients_other_languages.py reads them):
// model info; a streamed greedy Generate; Submit + Stream + Cancel; a bad request (the status
// code and message); and a call with a short deadline (DEADLINE_EXCEEDED).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "..", "protos", "shoal", "v1", "inference.proto");

// keepCase: field names as in the .proto (snake_case). With proto-loader's default
// (keepCase: false) the names become camelCase, and a snake_case key such as
// max_new_tokens is silently dropped: the server then sees 0 and answers INVALID_ARGUMENT.
// longs: String: 64-bit integers (seed, total_tokens) as decimal strings, never rounded.
// enums: String: enum values by name ("FINISH_REASON_LENGTH", "PRIORITY_HIGH").
// defaults: unset fields read as their zero value; oneofs: set the oneof's virtual field.
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const shoal = grpc.loadPackageDefinition(definition).shoal.v1;

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const target = option("target", process.env.SHOAL_TARGET || "127.0.0.1:50051");
const promptTokenIds = option("prompt-token-ids", "1,2,3").split(",").map(Number);
const maxNewTokens = Number(option("max-new-tokens", "8"));
const TIMEOUT_MS = 30000; // every call gets a deadline; a stuck server fails the call, not us

const client = new shoal.Inference(target, grpc.credentials.createInsecure());
const deadline = (ms = TIMEOUT_MS) => ({ deadline: new Date(Date.now() + ms) });
const statusName = (code) => grpc.status[code]; // 3 -> "INVALID_ARGUMENT"

// Unary calls as promises.
function unary(method, request, options = deadline()) {
  return new Promise((resolve, reject) =>
    client[method](request, options, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

async function main() {
  // 1. Model info.
  const info = await unary("GetModelInfo", {});
  console.log(
    `info name=${info.name} architecture=${info.architecture} vocab_size=${info.vocab_size} ` +
      `max_context=${info.max_context} eos_token_ids=${info.eos_token_ids.join(",")} device=${info.device}`,
  );

  // 2. A streamed greedy Generate (temperature 0). The stream ends with one chunk carrying
  //    the finish reason, usage and timing, then status OK.
  const tokens = [];
  let finish = "";
  for await (const chunk of client.Generate(
    { prompt_token_ids: promptTokenIds, max_new_tokens: maxNewTokens, temperature: 0, ignore_eos: true },
    deadline(),
  )) {
    tokens.push(...chunk.token_ids);
    if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") finish = chunk.finish_reason;
  }
  console.log(`generate token_ids=${tokens.join(",")} finish_reason=${finish}`);

  // 3. Submit a long request, follow it with Stream, cancel it after its first tokens. The
  //    stream's last chunk says FINISH_REASON_CANCELLED.
  const long = Math.max(1, Math.min(2000, info.max_new_tokens_limit || 2000, info.max_context - promptTokenIds.length));
  const { request_id } = await unary("Submit", {
    prompt_token_ids: promptTokenIds,
    max_new_tokens: long,
    ignore_eos: true,
  });
  console.log(`submit request_id=${request_id}`);
  let streamed = 0;
  let cancelled = null;
  let streamFinish = "";
  for await (const chunk of client.Stream({ request_id, from_index: 0 }, deadline())) {
    streamed += chunk.token_ids.length;
    if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") streamFinish = chunk.finish_reason;
    if (cancelled === null && streamed > 0) {
      cancelled = (await unary("Cancel", { request_id })).cancelled;
      console.log(`cancel cancelled=${cancelled}`);
    }
  }
  console.log(`stream request_id=${request_id} tokens=${streamed} finish_reason=${streamFinish}`);

  // 4. A bad request: the status is INVALID_ARGUMENT and the message names the field.
  try {
    await unary("Submit", { prompt_token_ids: promptTokenIds, max_new_tokens: 4, temperature: -1 });
    console.log("bad_request code=OK");
  } catch (error) {
    console.log(`bad_request code=${statusName(error.code)} message=${error.details}`);
  }

  // 5. A short deadline on a long Generate: DEADLINE_EXCEEDED (and the server aborts it).
  try {
    for await (const chunk of client.Generate(
      { prompt_token_ids: promptTokenIds, max_new_tokens: long, ignore_eos: true },
      deadline(200),
    )) {
      void chunk;
    }
    console.log("deadline code=OK");
  } catch (error) {
    console.log(`deadline code=${statusName(error.code)}`);
  }
}

main()
  .catch((error) => {
    console.error(`error: ${error.code !== undefined ? statusName(error.code) + ": " : ""}${error.message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
