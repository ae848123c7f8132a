"""Frozen English word list for the character tasks (letter counting, spelling, reversal).

Harvested once from the docstrings of the CPython 3.11 standard library (lowercase alphabetic words of
3-12 letters with a vowel, used in at least 3 modules) and frozen here, so every machine gets the same
words and therefore the same train/val/test split; re-harvesting on another Python version would shift it.
"""

WORDS: tuple[str, ...] = tuple("""
abbreviated abc ability able abort aborted about above absent absolute abstract abstraction accept acceptable
accepted accepting accepts access accessed accesses accessible accessing according accordingly account acquire
acquired across act action actions active activity acts actual actually adapted add added adding addition
additional addr address addresses adds adhere adjacent adjust adjusted adjustment advancing advantage affect
affected affects after afterwards again against aifc aka algorithm algorithms alias aliases alive all
allocated allow allowed allowing allows almost alone along alpha already also alter altered alternate
alternative alternatives although always among amount analogous ancestors anchor and angle animation annotated
annotation annotations anonymous another answer any anymore anything anyway anywhere apart app appear
appearance appeared appears append appended appending appends applicable application applications applied
applies apply applying approach appropriate approximate arbitrarily arbitrary arc architecture archive
archives are area arg args argument arguments arithmetic around arranges array arrays arrow article ascii ask
aspects assert assign assigned assignment assignments associated assume assumed assumes assuming async
asynchronous asyncio atexit atom attach attached attempt attempted attempting attempts attr attribute
attributes attrs audio author automatic available avoid avoids await awaited aware away back background
backslash backslashes backup backward backwards bad bar bare barrier base based bases basic basically basis
baz became because become becomes been before begin beginning begins behave behaves behavior behaviour being
belong belongs below best better between beyond big bin binary bind binding bindings bit bitmap bits blank
blanks block blocked blocking blocks blue bodies body bogus boilerplate bool boolean border both bottom bound
boundaries boundary bounded bounding box brackets branch break breaking breaks broken browser buffer buffered
buffering buffers bufsize bug bugs build builder building builds built builtin builtins bunch but button
buttons byte bytearray bytecode bytes bytestring cache cached caches calculate calculated call callable
callables callback callbacks called caller calling calls came can cancel cancellation cancelled candidate
cannot canonical canvas capabilities capability capable capture captured capturing care carry case cases catch
caught cause caused causes cell central certain certfile certificate certificates chain change changed changes
changing channel channels char character characters chars charset check checked checking checks child children
choice choices choose chosen chunk chunks chunksize circle circular class classes classic classmethods clause
clean cleanup clear cleared clears client clients clock cloned close closed closes closest closing code codec
codecs codes coding collapsed collect collected collecting collection collections colon color colors column
columns combination combine combined combining come comma command commandline commands commas comment
commented comments common commonly comp compact compare compared compares comparing comparison comparisons
compatible compilation compile compiled compiler compilers compiles compiling complement complete completed
completely completes completing completion complex compliance compliant complicated component components
composite compound compress compressed compression computation compute computed computing concatenated
concrete concurrent concurrently condition conditional conditions config configure configured conflicting
conform confusing conn connect connected connecting connection connections connects consecutive consider
considered considering consist consistent consisting consists console const constant constants construct
constructed constructing construction constructor constructs consume consumed consumer consumes contain
contained container containers containing contains content contents context contexts continuation continue
continuous control controlled controlling controls convenience convenient convention conventions conversion
convert converted converter converting converts cookie coordinate coordinates copied copies copy copying
copyright core corner coroutine coroutines correct correctly correspond corresponds could count counted
counter counterparts counting counts course covered create created creates creating creation cross ctypes
cumulative current currently cursor custom customize customized cycle cycles daemon dashes data database
datagram datatype date dates datetime day days deadlock deal deals debug debugged debugger debugging decide
decimal declaration declarations declare declared decode decoded decoder decoders decodes decoding decorated
decorator decorators decrement decremented deemed deep def default defaulting defaults defect defects define
defined defines defining definition definitions del delay delete deleted deletes deleting deletion delimited
delimiter delimiters delivery delta denominator depend dependencies dependency dependent depending depends
deprecated depth derive derived derives descendant descendants describe described describes describing
description descriptions descriptor descriptors design designed desirable desired dest destination destroyed
detached detail detailed details detect detected determine determined determines determining dev developed
deviation device diagnostic diagram dialog dialogs dict dictionaries dictionary dicts did diff differ
difference differences different differently differs digest digit digits dir direct direction directly
directories directory directs dirs disable disabled disagree discard discarded disk dispatch display displayed
displaying displays dist distance distinct distinction distinguish distributed distribution distutils divide
divided division doc docs docstring docstrings doctest document documented documents does doing domain done
dot dots dotted double down dragging draw drawing drawn drive driven driver drop dropped due dumb dummy dump
duplicate duplicated duplicates duration during dynamic dynamically each earlier easier easily east easy echo
edge effect effective effectively effects efficiency efficient effort eggs either elem element elements
eliminate eliminating else elsewhere email embedded emit emits emitted empty enable enabled enables
encapsulates enclosed encode encoded encoder encodes encoding encodings encountered encrypted end ending
endings endpoint ends enforced engine enhanced enough enqueued ensure ensures ensuring enter entered entering
entire entirely entities entity entries entry enum env environment environments epoch equal equality equals
equivalent equivalently error errors escape escaped escapes especially essentially establish established etc
evaluate evaluated evaluates even event events eventually ever every everything exact exactly examined example
examples exc exceed exceeds except exception exceptions excluding exclusive exclusively exec executable
executables execute executed executes executing execution executor exhausted exist existence existing exists
exit exited exiting exits expand expanded expansion expect expectations expected expects expired expires
explaining explicit explicitly exponent export exports expose exposed exposes expressed expression expressions
ext extend extended extensible extension extensions extent external extra extract extracted facility fact
factory fail failed failing fails failure failures fall fallback falls false familiar family fancy far fast
faster favor feature features feed feeding fetch fetched few field fields figure file filename filenames
fileobj files filesystem filesystems fill filled filter filtered filtering filters final finalizer finally
find finder finders finds fine finish finished finite first fit five fix fixed fixer fixers flag flags
flexible float floating floats flow flush flushed flushing focus folded folding follow followed following
follows font foo for force forces fork form format formats formatted formatter formatting formed former forms
forward found four fragment fragments frame frames framework free frequency fresh from front frozen full
fullname fully func funcname function functions functools further future futures garbage gateway gencodec
general generally generate generated generates generating generation generator generators generic geometry get
getopt gets getting gid give given gives giving glob global globals goes going good got grammar graphics
greater greatest greedy green greeting group grouped grouping groups guarantee guaranteed guarantees guess
guessed guide gzip hack had half hand handle handled handler handlers handles handling handshake handy happen
happens hard hardlink has hash hashable have having head header headers heading height held hello help helper
helpers helpful helps hence here hex hexadecimal hidden hierarchical hierarchy high higher highest hint hit
hold holding holds home hook hooks horizontal horizontally host hostname hosts how however human hyphens idea
identical identified identifier identifiers identifies identify identifying ids iff ignore ignored ignoring
illegal image images imap immediate immediately immutable implement implemented implementing implements
implicit implicitly implied implies imply import important imported importers importing importlib imports
impossible include included includes including inclusion inclusive incoming incompatible incomplete
inconsistent incorrect incorrectly increases increasing increment incremental incremented indent indentation
indented independent index indexes indexing indicate indicated indicates indicating indicator indices
indirectly individual inferred infinite info information informs inherit inheritance inherited inherits init
initial initialize initialized initializer initially injection inner input inputs insensitive insert inserted
inserting insertion inserts inside inspect install installation installed installing instance instances
instantiate instantiated instead instruction instructions int intact integer integers integral intended
interaction interactive interested interesting interface interfaces interior intermediate internal internally
internals internet interpreted interpreter interval into intrinsic introduced ints invalid invariant inverse
invocation invoke invoked invokes invoking involve involved issue issued issues item items iter iterable
iterables iterate iterated iteration iterator iterators itertools its itself job join joined joining json jump
jumps just keep keeping keeps kept kernel key keyboard keyed keyfile keys keyword keywords kind know knowledge
known knows kwarg kwargs label labels lacks lambda lambdas lang language languages large larger last late
later latter launching layer lazy lead leader leading leaf least leave leaves leaving left leftmost legacy
legal lemburg length less let lets letter letters level levels lib libraries library license lies lightweight
like likely likewise limit limited limits line linear lineno lines linesep link linked linking links list
listed listening listing lists literal literals little live lives load loaded loader loaders loading loads
local locale localhost localization locals located locating location locations lock locked locks log logger
logging logic logical login logs long longer longest look looked looking looks lookup lookups loop loops lose
lost lots low lower lowercase lowest lzma machine machinery macros made magic mail mailbox main mainloop
mainly maintain maintained maintaining maintains maintype major make makes making mal manage managed
management manager managers manages managing mandatory manipulate manipulated manipulating manipulation manner
manually many map mapped mapping mappings maps mark marked marker markers marks mask master match matched
matcher matches matching math matter matters max maximal maximum maxlinelen maxsize may maybe mean meaning
meaningful meanings means meant measure measured mechanism mechanisms member members memo memory mentioned
menu merged message messages metaclass metadata method methods middle might milliseconds mime mimics min
minidom minimal minimum minor minus missing mixed mixin mod mode model modern modes modification modified
modifies modify modifying module modules modulo moment monitor mono month more most mostly mount mouse move
moved movement moves mtime much multiline multipart multiple multiplexer must mutable mutated naive name named
namedtuple names namespace namespaces naming native natural nbytes near nearest nearly necessarily necessary
need needed needs negative neither nested nesting network never new newer newest newline newlines newly next
nice nicely node nodes noise none nonempty nonzero nor normal normalized normally not notation note nothing
noticeable notified notion now null num number numbers numeric numerical obj object objects obsolete obtain
obtained occur occurred occurrence occurrences occurring occurs octets odd off offers offset offsets often old
older oldest omit omitted once one ones only onto onwards opaque opcode open opened opening opens operand
operate operates operating operation operations operator operators opposed opposite optimization optimize
optimized option optional optionally options order ordered ordering ordinal ordinary origin original
originally other others otherwise our out outcome outer output outputs outside over overhead overridden
override overrides overriding overview overwrite overwriting overwritten own owned owner pack package packages
packed pad padded padding page pages pair pairs panes parallel param parameter parameters params parens parent
parentheses parents parse parsed parser parsers parses parsing part partial partially particular particularly
parts pass passed passes passing passwd password past patch patched path pathlib pathname pathnames paths
pattern patterns payload peer pen pending per perform performance performed performs perhaps period periods
permission permissions permitted pertaining pgen phase phrase physical pick pickle pickled pickling pid piece
pip pipe pipes pixel pixels place placed placeholder placeholders places plain platform platforms please plus
point pointed pointer pointing points policy polygon pool pops popular port portable portion pos position
positional positioned positions positive posix possibility possible possibly post potential potentially pow
powerful practical preceded precedence preceding precise precision predefined predicate predicates preference
preferred prefix prefixed prefixes prepare prepared prepend prepended presence present presented presents
preserved preserves preserving press pressed pressing presumably pretty prevent prevents previous previously
primarily primary print printable printed printing prints prior priority private probably problem problems
proceed proceeds process processed processes processing processor produce produced produces producing product
profile profiler program programming programs progress project prompt prompts propagate propagated proper
properly properties property protocol protocols provide provided provides providing proxies proxy public pure
purpose purposes put pyconfig pydoc python pytree qname qualified queries query querying question queue queued
quickly quiet quite quotation quote quoted quotes quoting race raise raised raises raising ran random range
ranges rarely rate rather ratio raw reachable reached reaches read readable reader reading readline readonly
reads ready real really reason reasonable reasons receipt receive received receiving recent recently recognize
recognized recognizes recommended record recorded records recurse recursion recursive recursively red redefine
redirect redirected redirects reduce reduced reduces refactored refactoring refer reference referenced
references referring refers reflect regardless regex register registered registering registry regular rejected
related relative release released releases relevant reliable relief relies rely remain remainder remaining
remains remember remembered remembers remote remove removed removes removing rendered repeated repeatedly
repeats repetitions replace replaced replacement replacements replaces replacing reply report reported
reporting reports repository repr represent represented representing represents request requested requests
require required requirement requirements requires res reserved reset resets resolution resolve resolved
resolving resource resources respect respective respectively response responses responsible rest restore
restored restores restrictions result resulting results resume resumes retained retaining retrieval retrieve
retrieved return returncode returned returning returns reuse reused reverse rewind rewrites right risk root
rooted roots rotate rotation round rounded routine routines row rows rule rules run runner running runs
runtime safe safely safety same sample samples sampling satisfy save saved saves say scale scanned scheduled
scheduling scheme schemes scope screen script scripts search searched searching second seconds section
sections secure security see seek seekable seeking seem seems seen segment segments select selected selecting
selection selector selects self semantics semaphore send sending sends sense sent sentinel separate separated
separately separating separation separator separators seq sequence sequences sequential serialized series
serve server servers serves service session set sets setting settings setup seven several shall shallow shape
share shared shell short shorter shortest shorthand should show showing shown shows shutdown sibling side sign
signal signals signature signatures significant silently similar similarly simple simplest simply simultaneous
since single site situations six size sizes skip skipped slash slashes slice slightly slot slots slow small
smaller smallest sock socket sockets software solely some someone something sometimes somewhat soon sort
sorted sorting source sources space spaces spam span spawn spawned spawning spec special specialized specially
specific specifically specified specifier specifiers specifies specify specifying speed split splits square
sre stable stack standard standards start started starting starts startup stat state statement statements
states static statistics status stderr stdin stdlib stdout step steps stereo still stop stopping stops storage
store stored stores storing stream streaming streams stretched strict strictly string strings strip stripped
stripping strong struct structure structures stuff style subclass subclassed subclasses subclassing subcommand
subdirectory subject submodule submodules subparts subprocess subsequence subsequent subsequently subset
substituted substituting substitution substring substrings subtract subtraction subtree subtype succeeds
success successful successfully successive successively such sufficient suffix suffixes suitable suite suites
sum summaries summary super superclass supplied supplies supply supplying support supported supporting
supports supposed suppress sure switch switched symbol symbolic symbols symlink symlinks synchronous syntax
syscall system systems tab table tables tabs tag tags tail take taken takes taking tar target targets task
tasks technique tell tells template temporarily temporary terminal terminate terminated terminates terminating
terminator terms test tested testing tests text texts textual than that the their them themselves then there
therefore thereof thereto these they thing things think third this those though thread threading threads three
through throws thus tied time timed timeout timer times timestamp timezone timing title tkinter together token
tokenize tokenizer tokens too tool tools top toplevel total towards trace traceback tracing track tracking
trailing transaction transfer transform transformed transforms transient translate translated translating
translation transmission transmit transparent transport traversal traversing treat treated treatment tree
trees tried tries triggered triple triples trouble true truncate truncated trying tuple tuples turn turned
turns turtle turtledemo turtles twice two type typed types typical typically typing uid unable unavailable
unblocks unbounded unbuffered unchanged uncompressed undefine undefined under underline underlying underscore
underscores understand understands undo undone unexpected unfolded unformatted unicode unified uniformly union
unique uniquely unit units unittest unknown unless unlike unmodified unpack unpacked unpickling unquoted
unread unset unsigned unspecified unsupported until unusable update updated updates updating upon upper
uppercase uri url urllib usable usage use used useful user username users uses using usr usual usually
utilities utility val valid validate validation value values van var variability variable variables variant
variants varies various vars verbose verified verify versa version versions vertical vertically very via vice
view virtual visible visual wait waiting wake walk want wants warning warnings was way ways weak web week
weekday weight well were west what whatever wheel when whence whenever where whereas whether which while white
whitespace who whole whose wide widget widgets width wiki wildcard will window windows wish wishes with within
without word words work worker workers working works world worry worth would wrap wrapped wrapper wrappers
wrapping wraps writable write writeframes writer writers writes writing written wrong year yes yet yield
yielded yielding yields you your yourself zero zip zipfile zone
""".split())
