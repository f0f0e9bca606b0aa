# Evaluates nixos/module.nix against a minimal stand-in of the NixOS option
# system (no nixpkgs here): option defaults, the user's settings on top,
# then mkIf / mkBefore / mkDefault resolved into plain values, printed as
# JSON for tests/nixos_module.rs to check.
{ userJson }:

let
  user = builtins.fromJSON userJson;
  inherit (builtins) isAttrs isList mapAttrs filter attrNames listToAttrs;

  types = {
    bool = "bool";
    str = "str";
    port = "port";
    path = "path";
    package = "package";
    nullOr = t: "nullOr ${t}";
    listOf = t: "listOf ${t}";
  };

  lib = rec {
    inherit types;
    mkOption = attrs: { _type = "option"; } // attrs;
    mkEnableOption = name: mkOption { type = types.bool; default = false; description = name; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkBefore = content: { _type = "order"; priority = 500; inherit content; };
    mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
    optional = c: x: if c then [ x ] else [ ];
    optionalAttrs = c: a: if c then a else { };
    recursiveUpdate = a: b:
      a // mapAttrs
        (n: v: if isAttrs v && isAttrs (a.${n} or null) then recursiveUpdate a.${n} v else v)
        b;
  };

  pkgs.formats.toml = { }: {
    type = "toml";
    generate = name: value: {
      _type = "generated";
      inherit name value;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    };
  };

  module = import ../../nixos/module.nix;
  options = (module { config = { }; inherit lib pkgs; }).options.services.nixmesh;
  defaults = mapAttrs (n: o: o.default or null) options;
  cfg = defaults // { package = "/nix/store/11111111111111111111111111111111-nixmesh"; } // user;
  config = (module { config.services.nixmesh = cfg; inherit lib pkgs; }).config;

  resolve = v:
    if isAttrs v then
      if v._type or null == "if" then (if v.condition then resolve v.content else null)
      else if v._type or null == "order" then { _order = v.priority; value = resolve v.content; }
      else if v._type or null == "override" then resolve v.content
      else if v._type or null == "generated" then { generated = v.name; path = v.outPath; value = v.value; }
      else
        let resolved = mapAttrs (n: resolve) v;
        in listToAttrs (map (n: { name = n; value = resolved.${n}; })
          (filter (n: resolved.${n} != null) (attrNames resolved)))
    else if isList v then map resolve v
    else v;
in
{
  optionNames = attrNames options;
  config = resolve config;
}
