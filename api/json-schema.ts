/**
 * The part of TypeBox's `Type` builder the server's request schemas use (api/schemas.ts,
 * appliance/recovery/routes.ts), making the same JSON Schema objects with TypeBox's types, so
 * `Static<typeof X>` still gives each body's TypeScript type.
 *
 * Why not TypeBox itself: its index loads about 200 modules, a third of what a server loaded
 * when it started (720), all to build some 40 small objects once. The config (appliance/config)
 * still uses TypeBox, for its validator too; a server reads the config's kept parsed copy.
 *
 * test/api/schemas.test.ts builds every schema with this and with TypeBox and checks that they
 * are the same JSON.
 */
import type {
  ArrayOptions,
  IntegerOptions,
  NumberOptions,
  ObjectOptions,
  SchemaOptions,
  StringOptions,
  TArray,
  TBoolean,
  TInteger,
  TNull,
  TNumber,
  TObject,
  TOptional,
  TProperties,
  TRecord,
  TSchema,
  TString,
  TTuple,
  TUnion,
  TUnknown,
} from '@sinclair/typebox';

/** Marks a property Type.Optional made (TypeBox's own marker is a symbol too: JSON never shows it). */
const OPTIONAL = Symbol('optional');

type Schema = Record<string | symbol, unknown>;

function isOptional(s: TSchema): boolean {
  return (s as unknown as Schema)[OPTIONAL] === true;
}

export const Type = {
  String(options: StringOptions = {}): TString {
    return { ...options, type: 'string' } as unknown as TString;
  },
  Integer(options: IntegerOptions = {}): TInteger {
    return { ...options, type: 'integer' } as unknown as TInteger;
  },
  Number(options: NumberOptions = {}): TNumber {
    return { ...options, type: 'number' } as unknown as TNumber;
  },
  Boolean(options: SchemaOptions = {}): TBoolean {
    return { ...options, type: 'boolean' } as unknown as TBoolean;
  },
  Null(options: SchemaOptions = {}): TNull {
    return { ...options, type: 'null' } as unknown as TNull;
  },
  Unknown(options: SchemaOptions = {}): TUnknown {
    return { ...options } as unknown as TUnknown;
  },
  /** A property an object may leave out (not in its `required`). */
  Optional<T extends TSchema>(schema: T): TOptional<T> {
    return { ...schema, [OPTIONAL]: true } as unknown as TOptional<T>;
  },
  Object<T extends TProperties>(properties: T, options: ObjectOptions = {}): TObject<T> {
    const required = Object.keys(properties).filter((k) => !isOptional(properties[k]!));
    return { ...options, type: 'object', ...(required.length > 0 ? { required } : {}), properties } as unknown as TObject<T>;
  },
  Array<T extends TSchema>(items: T, options: ArrayOptions = {}): TArray<T> {
    return { ...options, type: 'array', items } as unknown as TArray<T>;
  },
  Union<T extends TSchema[]>(anyOf: [...T], options: SchemaOptions = {}): TUnion<T> {
    return { ...options, anyOf } as unknown as TUnion<T>;
  },
  /** An array of exactly these items, in this order. */
  Tuple<T extends TSchema[]>(items: [...T], options: SchemaOptions = {}): TTuple<T> {
    return { ...options, type: 'array', items, additionalItems: false, minItems: items.length, maxItems: items.length } as unknown as TTuple<T>;
  },
  /**
   * An object whose every property is a `value`, under any name: as TypeBox's Record with a
   * string key, whose own constraints (a maxLength) are not checked there either.
   */
  Record<V extends TSchema>(_key: TString, value: V, options: ObjectOptions = {}): TRecord<TString, V> {
    return { ...options, type: 'object', patternProperties: { '^(.*)$': value } } as unknown as TRecord<TString, V>;
  },
};
