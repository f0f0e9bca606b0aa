# Evaluates nixos/module.nix against a minimal stand-in of the NixOS option
# system (no nixpkgs here): option defaults, the user's settings on top,
# then mkIf / mkBefore / mkDefault resolved into plain values, printed as
# JSON for tests/nixos_module.rs to check. `othersJson`: the substituters
# other modules set (NixOS's default is cache.nixos.org), which NixOS merges
# after the module's mkBefore'd own.
{ userJson, othersJson ? ''["https://cache.nixos.org/"]'' }:

let
  user = builtins.fromJSON userJson;
  inherit (builtins) isAttrs isList mapAttrs filter attrNames listToAttrs substring stringLength;

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
    hasPrefix = p: s: substring 0 (stringLength p) s == p;
    removeSuffix = suffix: s:
      let n = stringLength s; k = stringLength suffix;
      in if k <= n && substring (n - k) k s == suffix then substring 0 (n - k) s else s;
    # Literal separators only: each character in a bracket expression.
    splitString = sep: s:
      let chars = builtins.genList (i: "[${substring i 1 sep}]") (stringLength sep);
      in filter builtins.isString (builtins.split (builtins.concatStringsSep "" chars) s);
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
  # NixOS's merge of nix.settings.substituters: the module's own (it
  # orders them first) and then the others'.
  own = (resolve config).nix.settings.substituters.value or [ ];
  merged = own ++ builtins.fromJSON othersJson;
  config = (module {
    config = { services.nixmesh = cfg; nix.settings.substituters = merged; };
    inherit lib pkgs;
  }).config;

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
