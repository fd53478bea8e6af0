// A small JSON Schema validator covering what crates/node/openapi.json uses ($ref, type, enum,
// properties, required, additionalProperties, items, oneOf, anyOf, minimum/maximum,
// exclusiveMinimum), for tests.
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export type Schema = Record<string, unknown>;
export const doc = JSON.parse(readFileSync(resolve(dirname(fileURLToPath(import.meta.url)), "../../../crates/node/openapi.json"), "utf8")) as {
  components: { schemas: Record<string, Schema> };
  paths: Record<string, unknown>;
};

function typeOf(v: unknown): string[] {
  if (v === null) return ["null"];
  if (Array.isArray(v)) return ["array"];
  if (typeof v === "number") return Number.isInteger(v) ? ["integer", "number"] : ["number"];
  return [typeof v];
}

export function validate(s: Schema, v: unknown, path = "$"): string[] {
  if (typeof s.$ref === "string") {
    const name = s.$ref.replace("#/components/schemas/", "");
    const target = doc.components.schemas[name];
    if (!target) return [`${path}: unknown $ref ${s.$ref}`];
    return validate(target, v, path);
  }
  const errs: string[] = [];
  if (s.oneOf) {
    const ok = (s.oneOf as Schema[]).filter((x) => validate(x, v, path).length === 0).length;
    if (ok !== 1) errs.push(`${path}: matches ${ok} of oneOf`);
  }
  if (s.anyOf) {
    if (!(s.anyOf as Schema[]).some((x) => validate(x, v, path).length === 0)) errs.push(`${path}: matches none of anyOf`);
  }
  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? (s.type as string[]) : [s.type as string];
    if (!typeOf(v).some((t) => types.includes(t))) return [...errs, `${path}: ${JSON.stringify(v)} is not ${types.join("|")}`];
  }
  if (s.enum && !(s.enum as unknown[]).includes(v)) errs.push(`${path}: ${JSON.stringify(v)} not in enum`);
  if (typeof v === "number") {
    if (typeof s.minimum === "number" && v < s.minimum) errs.push(`${path}: below minimum`);
    if (typeof s.maximum === "number" && v > s.maximum) errs.push(`${path}: above maximum`);
    if (typeof s.exclusiveMinimum === "number" && v <= s.exclusiveMinimum) errs.push(`${path}: not above exclusiveMinimum`);
  }
  if (Array.isArray(v) && s.items) v.forEach((x, i) => errs.push(...validate(s.items as Schema, x, `${path}[${i}]`)));
  if (v && typeof v === "object" && !Array.isArray(v)) {
    const o = v as Record<string, unknown>;
    const props = (s.properties ?? {}) as Record<string, Schema>;
    for (const r of (s.required ?? []) as string[]) if (!(r in o)) errs.push(`${path}: missing ${r}`);
    for (const [k, x] of Object.entries(o)) {
      if (props[k]) errs.push(...validate(props[k], x, `${path}.${k}`));
      else if (s.additionalProperties === false) errs.push(`${path}: unexpected property ${k}`);
    }
  }
  return errs;
}

export const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
